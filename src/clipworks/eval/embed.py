"""Embed a :class:`~clipworks.eval.datasets.LabelledImages` in order; unreadable images are skipped and counted."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from clipworks.errors import ClipworksError
from clipworks.eval.datasets import LabelledImages
from clipworks.pipeline import Failure, embed_files
from clipworks.runtime.encoder import ClipModel


@dataclass
class EmbeddedImages:
    """Unit image embeddings ``(N, D)`` and their class indices; ``skipped``: the images that could not be read."""

    embeddings: np.ndarray
    labels: np.ndarray
    skipped: list[Failure]


def embed_dataset(
    model: ClipModel,
    dataset: LabelledImages,
    *,
    batch_size: int = 32,
    on_skip: Callable[[Failure], None] | None = None,
) -> EmbeddedImages:
    """Files go through the threaded pipeline (bad ones warned about, by name, and left out); CIFAR's arrays,
    already decoded, straight to the model in batches."""
    if dataset.layout.startswith("cifar"):
        emb = model.encode_images(iter(dataset.images), batch_size=batch_size)
        return EmbeddedImages(emb, dataset.labels, [])
    result = embed_files(model, list(dataset.images), batch_size=batch_size, on_skip=on_skip)
    failed = {f.path for f in result.failures}
    keep = np.array([str(p) not in failed for p in dataset.images], dtype=bool)
    if not keep.any():
        raise ClipworksError(f"none of the {len(dataset)} images of {dataset.source} could be read")
    return EmbeddedImages(result.embeddings, dataset.labels[keep], result.failures)
