"""Model names, bundles on disk, and downloads."""
