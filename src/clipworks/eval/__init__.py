"""Evaluation: zero-shot accuracy (``zeroshot``) and the CLIP paper's linear probe (``probe``) on labelled images
(``datasets``: CIFAR pickles, ImageFolder trees, CSV/JSON listings)."""
