"""The ``export`` bundle source: open_clip's weights exported into the clipworks cache.

``clipworks.models.sources`` names this class by its module path and imports it only when a bundle is to be
exported, so loading a model never imports the exporter (nor, through it, torch).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from clipworks.errors import status
from clipworks.models.bundle import DEFAULT_PRECISIONS, is_bundle_dir
from clipworks.models.registry import parse_model_name


class ExportSource:
    name = "export"
    prefix = None  # registry names only: an export needs an architecture and a tag
    fetches = True

    def find(self, target: str) -> Path | None:
        cached = parse_model_name(target).cache_path()
        return cached if is_bundle_dir(cached) else None

    def fetch(
        self,
        target: str,
        *,
        force: bool = False,
        precisions: tuple[str, ...] = DEFAULT_PRECISIONS,
        log: Callable[[str], None] = status,
    ) -> Path:
        from clipworks.export.exporter import export_model

        ref = parse_model_name(target)
        dest = ref.cache_path()
        dest.parent.mkdir(parents=True, exist_ok=True)
        export_model(ref.arch, dest, pretrained=ref.tag, precisions=precisions, log=log)
        return dest

    @staticmethod
    def knows_architecture(arch: str) -> bool:
        """Whether open_clip has a config called ``arch`` (False without the export extra)."""
        try:
            import open_clip
        except ImportError:
            return False
        return arch in open_clip.list_models()
