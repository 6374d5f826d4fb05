"""Calibration inputs for NPU compilers: the user's photos as the runtime preprocesses them, and real prompts.

Compilers quantise from sample inputs. The Axera port fed its text encoder random token ids, whose activation
ranges are nothing like a prompt's; here the text tower gets real prompts (a user file, or the shipped class
names in their templates) through the bundle's own tokenizer, and the image tower gets the user's photos through
``clipworks.imaging.preprocess``, the function ``ClipModel.encode_images`` runs, so the compiler calibrates on
exactly what it will see.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipworks.errors import UsageError, status
from clipworks.export.precision import calibration_pixels
from clipworks.models.family import TextTokenizer

DEFAULT_CALIBRATION_SIZE = 50
# The shipped class list whose names, in its own prompt templates, calibrate the text tower by default.
DEFAULT_PROMPT_SET = "imagenet1k"


@dataclass
class CalibrationSet:
    """``visual``: (N, 3, H, W) float32; ``textual``: (M, L) int32 token ids of ``prompts`` (after ``tokenize``)."""

    visual: np.ndarray
    prompts: list[str]
    images_source: str
    prompts_source: str
    textual: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int32))

    def tokenize(self, tokenizer: TextTokenizer) -> None:
        """Token ids of the prompts from the bundle's own tokenizer, padded to the static text length."""
        self.textual = tokenizer.encode(self.prompts, pad_to=tokenizer.context_length).astype(np.int32)

    def batches(self, tower: str, batch: int) -> list[np.ndarray]:
        """Samples shaped as the static graph's input: ``batch`` rows each, the last filled by repeating rows."""
        rows = self.visual if tower == "visual" else self.textual
        out = []
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            if len(chunk) < batch:
                chunk = np.concatenate([chunk, np.resize(chunk, (batch - len(chunk), *chunk.shape[1:]))])
            out.append(np.ascontiguousarray(chunk))
        return out


def read_calibration_set(
    preprocess_cfg: dict[str, Any],
    *,
    images: Sequence[Path],
    images_source: str,
    size: int = DEFAULT_CALIBRATION_SIZE,
    texts_file: Path | None = None,
    log: Callable[[str], None] = status,
) -> CalibrationSet:
    """Up to ``size`` photos of ``images`` (unreadable ones skipped with a warning) and ``size`` prompts.

    Read before the (slow) graph export, so a folder of broken photos or a missing prompt file fails at once.
    """
    if size < 1:
        raise UsageError(f"--calib-size must be at least 1, not {size}")
    pixels = calibration_pixels(images, preprocess_cfg, limit=size, log=log)
    if len(pixels) < size:
        log(f"calibrating on {len(pixels)} photos: {images_source} has no more readable ones (asked {size})")
    prompts, prompts_source = _prompts(texts_file, size)
    return CalibrationSet(pixels.astype(np.float32), prompts, images_source, prompts_source)


def _prompts(texts_file: Path | None, size: int) -> tuple[list[str], str]:
    if texts_file is not None:
        from clipworks.zeroshot import load_labels_file

        lines = load_labels_file(texts_file)  # one prompt a line; names the file when unreadable or empty
        return [lines[i % len(lines)] for i in range(min(size, len(lines)))], str(texts_file)
    from clipworks.eval.datasets import shipped_set
    from clipworks.labelbank import apply_template

    classes, templates = shipped_set(DEFAULT_PROMPT_SET)
    # Spread over the whole list (not its first `size` fish) and cycle through the templates.
    step = max(1, len(classes) // size)
    prompts = [
        apply_template(templates[i % len(templates)], [classes[(i * step) % len(classes)]])[0] for i in range(size)
    ]
    return prompts, f"the shipped {DEFAULT_PROMPT_SET} class names in its prompt templates"
