"""Torch wrappers around the two towers and their ONNX export.

Input and output names follow Immich's bundles (``image``/``text`` -> ``embedding``), so one runtime
reads both. Unlike Immich, batch and text length are dynamic and outputs are not normalised.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

DEFAULT_OPSET = 18


def _text_tower(model: Any) -> Any | None:
    """The module that owns the text transformer, when it is open_clip's own causal transformer.

    Hugging Face text towers (``HFTextEncoder``) and towers with a CLS token or padding mask are
    left to open_clip's own ``encode_text`` at full context length.
    """
    owner = model.text if hasattr(model, "text") else model
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    if not all(getattr(owner, n, None) is not None for n in needed):
        return None
    if getattr(owner, "cls_emb", None) is not None or getattr(owner, "use_pad_mask", False):
        return None
    return owner


def supports_dynamic_text_length(model: Any) -> bool:
    return _text_tower(model) is not None


def build_wrappers(model: Any) -> tuple[Any, Any]:
    import torch
    from open_clip.transformer import text_global_pool

    class ImageEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.model.encode_image(image)

    class TextEncoder(torch.nn.Module):
        """open_clip's ``encode_text`` with the positional embedding and causal mask cut to the input length.

        With a causal mask and end-of-text pooling, tokens after the end token never reach the pooled
        output, so padding a batch only to its longest prompt gives the same embeddings as padding to 77.
        """

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.tower = _text_tower(model)

        def forward(self, text: torch.Tensor) -> torch.Tensor:
            tower = self.tower
            if tower is None:
                return self.model.encode_text(text.long())
            ids = text.long()
            length = ids.shape[1]
            cast_dtype = tower.transformer.get_cast_dtype()
            x = tower.token_embedding(ids).to(cast_dtype)
            x = x + tower.positional_embedding[:length].to(cast_dtype)
            x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
            x = tower.ln_final(x)
            pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
            eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
            x = text_global_pool(x, ids, pool_type, eos_token_id=eos_id)
            projection = tower.text_projection
            if projection is not None:
                x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
            return x

    return ImageEncoder().eval(), TextEncoder().eval()


def export_towers(
    model: Any,
    image_size: tuple[int, int],
    context_length: int,
    visual_path: Path,
    textual_path: Path,
    *,
    opset: int = DEFAULT_OPSET,
    batch: int | None = None,
) -> bool:
    """Write both fp32 graphs. ``batch=None`` gives a dynamic batch axis; returns whether text length is dynamic.

    torch's dynamo exporter is used because the TorchScript tracer freezes the sequence length inside
    ``nn.MultiheadAttention``; ``torch.export`` keeps batch and length symbolic.
    """
    import torch

    image_encoder, text_encoder = build_wrappers(model)
    dynamic_text = batch is None and text_encoder.tower is not None
    example_batch = batch or 2
    image = torch.randn(example_batch, 3, *image_size)
    text_length = 8 if dynamic_text else context_length
    # Example ids inside the vocabulary (SigLIP's and multilingual ones are not CLIP's 49408), ending with the
    # largest id, as CLIP's end token is in real prompts.
    vocab_size = int(model.vocab_size)  # open_clip's CLIP and CustomTextCLIP both keep it
    text = torch.randint(1, min(1000, vocab_size - 1), (example_batch, text_length), dtype=torch.int32)
    text[:, -1] = vocab_size - 1
    batch_dim = torch.export.Dim("batch", min=1, max=65536) if batch is None else None
    length_dim = torch.export.Dim("length", min=2, max=context_length) if dynamic_text else None
    image_shapes = {"image": {0: batch_dim}} if batch_dim else None
    text_axes = {k: v for k, v in ((0, batch_dim), (1, length_dim)) if v is not None}
    text_shapes = {"text": text_axes} if text_axes else None
    for module, args, path, in_name, shapes in (
        (image_encoder, (image,), visual_path, "image", image_shapes),
        (text_encoder, (text,), textual_path, "text", text_shapes),
    ):
        _export_one(module, args, path, in_name, shapes, opset)
    return dynamic_text


# Protobuf caps a single file at 2 GiB; bigger graphs keep their weights in model.onnx.data beside it.
SINGLE_FILE_LIMIT = 1_800_000_000


def _export_one(module: Any, args: tuple[Any, ...], path: Path, input_name: str, shapes: Any, opset: int) -> None:
    import contextlib
    import io
    import tempfile

    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    quiet = contextlib.redirect_stdout(io.StringIO())  # the dynamo exporter prints its progress
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad(), quiet:
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(
            module, args, str(raw), input_names=[input_name], output_names=["clipworks_output"],
            dynamic_shapes=shapes, opset_version=opset, dynamo=True, external_data=True, verbose=False,
        )  # fmt: skip
        graph = onnx.load(str(raw))
    _rename_value(graph, "embedding", "embedding_internal")  # torch names the token lookup "embedding"
    _rename_value(graph, "clipworks_output", "embedding")  # Immich's output name
    large = graph.ByteSize() > SINGLE_FILE_LIMIT
    onnx.save(graph, str(path), save_as_external_data=large, location=path.name + ".data")


def _rename_value(model: Any, old: str, new: str) -> None:
    graph = model.graph
    for node in graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        if value.name == old:
            value.name = new
