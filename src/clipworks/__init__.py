"""clipworks: CLIP on ONNX Runtime, fast on ordinary machines and accelerators.

>>> import clipworks
>>> model = clipworks.load("ViT-B-32::openai")
>>> model.encode_texts(["a dog", "a cat"]).shape
(2, 512)
"""

from __future__ import annotations

from clipworks.errors import ClipworksError
from clipworks.models.registry import list_models
from clipworks.runtime.encoder import ClipModel, load

__version__ = "0.1.0"
__all__ = ["ClipModel", "ClipworksError", "__version__", "list_models", "load"]
