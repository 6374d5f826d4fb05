"""Which model made these vectors: one answer for the photo library and for every on-disk text cache.

Two views of one fingerprint, because two questions are asked of it:

- ``weights`` (with the name): may vectors be compared? Only between identical weights, whatever the
  precision or graph file. The library stores this pair with its vectors, so it must not change form.
- ``key()``: may a cached text matrix be reused? Only for the same text graph at the same precision. The
  graph's size and mtime stand in for its hash, so a re-export invalidates cached label embeddings
  without reading hundreds of MB on every start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipworks.models.bundle import graph_relpath


@dataclass(frozen=True)
class Fingerprint:
    name: str
    # The source weights' SHA-256, else ``model::pretrained`` (bundles exported before hashes were recorded).
    weights: str
    precision: str = ""
    # "path|size|mtime_ns" of the text graph the model runs, "" when it has none (or is not a bundle).
    text_graph: str = ""

    @property
    def vectors(self) -> tuple[str, str]:
        """(name, weights): what the library records with its vectors."""
        return self.name, self.weights

    def key(self) -> str:
        """Everything that decides a text tower's output, as one string for cache keys."""
        return "|".join((self.name, self.weights, self.precision, self.text_graph))


def model_fingerprint(model: Any) -> Fingerprint:
    """The fingerprint of a ``ClipModel`` (or of any object with a ``name``, as tests' stand-ins have)."""
    name = str(getattr(model, "name", type(model).__name__))
    precision = str(getattr(model, "precision", ""))
    bundle = getattr(model, "bundle", None)
    if bundle is None:
        return Fingerprint(name, "", precision)
    meta = bundle.meta
    weights = meta.source_sha256 or f"{meta.model}::{meta.pretrained}"
    # The text graph ClipModel.textual opens: the model's precision when the bundle has it, else fp32.
    text_precision = precision if precision in bundle.available_precisions("textual") else "fp32"
    graph = Path(bundle.root) / graph_relpath("textual", text_precision)
    text_graph = ""
    if graph.is_file():
        st = graph.stat()
        text_graph = f"{graph.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return Fingerprint(name, weights, precision, text_graph)
