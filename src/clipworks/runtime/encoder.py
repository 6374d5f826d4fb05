"""``ClipModel``: both towers of a bundle behind ``encode_images`` and ``encode_texts``.

Each tower implements one batch method (``embed_image_batch`` / ``embed_token_batch``); batching,
ordering and normalisation live once here, as simonw/llm's ``EmbeddingModel`` asks of its models.
Towers load lazily: a host that only matches images against a prompt file never loads the text side.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from clipworks.errors import BadBundle, UsageError
from clipworks.machine import Machine, this_machine
from clipworks.models.bundle import Bundle
from clipworks.models.family import Family, TextTokenizer, family_for
from clipworks.ops import l2_normalize
from clipworks.runtime.sessions import Backend, RuntimeSettings, Session, open_backend

PreprocessMode = Literal["exact", "fast"]


def resolve_precision(bundle: Bundle, precision: str, backend: Backend, machine: Machine | None = None) -> str:
    """``auto``: the fastest precision this machine runs without losing the bundle's checked accuracy.

    fp16 where the backend wants it (GPUs) and the bundle has it; on a CPU with int8 dot products (VNNI or
    AMX) the bundle's static int8 graph when its export check passed its cosine floor; fp32 otherwise.
    Without VNNI/AMX int8 stays opt-in: on AVX2 alone it gains little and it moves vectors. bf16 stays
    opt-in too (``--precision bf16`` on OpenVINO): no export check records it, and fp32 bundles are often
    someone else's vectors to match (Immich's).

    Dynamic int8 is never chosen for the user: it quantises each batch's activations with one scale taken
    over the whole batch, so a photo's vector depends on the photos beside it (ViT-B/32, alone against in a
    batch of 8: cosine 0.99984, max |diff| 2.9e-3; RESULTS.md). Static int8 fixes its scales at export, so
    the same input always gives the same vector, as fp32 does.
    """
    if precision != "auto":
        return precision
    have = bundle.available_precisions("visual")
    if backend.fp16:
        return "fp16" if "fp16" in have else "fp32"
    fixed_int8 = "int8-static" in have and _passed_floor(bundle, "int8-static")
    if fixed_int8 and (machine or this_machine()).has_int8_dot_product:
        return "int8-static"
    return "fp32"


def _passed_floor(bundle: Bundle, precision: str) -> bool:
    """Whether ``clipworks.json`` records an export check of ``precision`` at or above its floor.

    Immich's bundles record no checks, so auto never picks int8 for them.
    """
    check = bundle.meta.checks.get(precision)
    if not isinstance(check, dict) or "floor" not in check:
        return False
    cosines = [check.get(f"{tower}_min_cosine") for tower in ("visual", "textual")]
    return all(isinstance(c, int | float) and c >= check["floor"] for c in cosines)


Tower = Literal["visual", "textual"]
TOWERS: tuple[Tower, ...] = ("visual", "textual")


class ClipModel:
    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
        preprocess: PreprocessMode = "exact",
        profile: str = "open_clip",
        runtime: RuntimeSettings | None = None,
    ) -> None:
        """``profile``: whose pixels and token ids to reproduce, "open_clip" or "immich" (``clipworks.profiles``)."""
        from clipworks.profiles import get_profile

        self.bundle = bundle
        self.device = device
        runtime = runtime or RuntimeSettings()
        if threads is not None:
            runtime = replace(runtime, threads=threads)
        machine = this_machine()

        # An unknown or missing device fails here, not at first use; auto skips backends that refuse the precision.
        def usable(cls: type[Backend]) -> bool:
            if precision != "auto" and cls.refusal(precision, machine) is not None:
                return False
            faster = cls.faster_at
            return faster is None or resolve_precision(bundle, precision, cls(runtime), machine) in faster

        self.backend = open_backend(device, runtime, usable=usable, machine=machine)
        refused = None if precision == "auto" else self.backend.refusal(precision, machine)
        if refused:
            raise UsageError(f"precision {precision} on device {self.backend.name}: {refused}", setting="precision")
        self.precision = resolve_precision(bundle, precision, self.backend, machine)
        self.threads = runtime.threads
        self.preprocess_mode: PreprocessMode = preprocess
        self.family: Family = family_for(bundle)
        self.profile = get_profile(profile)
        self.graph("visual")  # fail now, with the bundle's precisions, not at first use
        # Towers load on first use, once: the lock keeps two threads from building the same session twice.
        self._lock = threading.Lock()
        self._visual: Session | None = None
        self._textual: tuple[Session, TextTokenizer] | None = None

    def share_cores_with_decoders(self) -> None:
        """The pipeline's call before its first batch: image decoders will run in threads beside the model, so
        ONNX Runtime's threads must not spin between ops on the cores they need. Changes nothing once the image
        tower is loaded or when ``RuntimeSettings.allow_spinning`` was set either way."""
        with self._lock:
            if self._visual is None and self.backend.settings.allow_spinning is None:
                self.backend.settings = replace(self.backend.settings, allow_spinning=False)

    # -- facts -------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def embed_dim(self) -> int:
        return self.bundle.embed_dim

    @property
    def logit_scale(self) -> float:
        return float(self.bundle.meta.logit_scale)

    @property
    def logit_bias(self) -> float | None:
        return self.bundle.meta.logit_bias

    @cached_property
    def preprocess_cfg(self) -> Any:
        from clipworks.imaging import PreprocessConfig

        return replace(PreprocessConfig.from_dict(self.bundle.preprocess_cfg), profile=self.profile.name)

    # -- towers (loaded once, on first use or by load_towers) ----------------------------------------
    def load_towers(self, *towers: Tower) -> None:
        """Load ``towers`` now ("visual", "textual": its session and tokenizer), each once, thread-safely.

        Use it where the first request should not pay for loading (a server, a stream with live prompts).
        """
        for tower in towers:
            if tower not in TOWERS:
                raise UsageError(f"unknown tower {tower!r}: use one of {', '.join(TOWERS)}")
            self._load(tower)

    def loaded(self, tower: Tower) -> bool:
        """Whether ``tower`` has been loaded (a host matching images only never loads the text side)."""
        return (self._visual if tower == "visual" else self._textual) is not None

    def _load(self, tower: Tower) -> None:
        if self.loaded(tower):
            return
        with self._lock:
            if self.loaded(tower):  # another thread loaded it while this one waited
                return
            if tower == "visual":
                self._visual = self.backend.open_session(self.graph("visual"), self.precision)
            else:
                self._textual = self._open_text_tower()

    def tower_precision(self, tower: Tower) -> str:
        """The precision ``tower`` runs at: the model's, or fp32 where the bundle lacks that text graph."""
        if tower == "visual":
            return self.precision
        have = self.bundle.available_precisions("textual")
        return self.precision if self.backend.graph_precision(self.precision) in have else "fp32"

    def graph(self, tower: Tower) -> Path:
        """The bundle file ``tower`` runs from on this backend."""
        return self.bundle.graph(tower, self.backend.graph_precision(self.tower_precision(tower)))

    def _open_text_tower(self) -> tuple[Session, TextTokenizer]:
        if not self.bundle.has_text_tower():
            raise BadBundle(f"{self.bundle.root} has no text encoder (textual/model.onnx); use a full bundle")
        session = self.backend.open_session(self.graph("textual"), self.tower_precision("textual"))
        return session, self.profile.tokenizer(self.bundle, self.family)

    @property
    def visual(self) -> Session:
        self._load("visual")
        assert self._visual is not None
        return self._visual

    @property
    def textual(self) -> Session:
        self._load("textual")
        assert self._textual is not None
        return self._textual[0]

    @property
    def tokenizer(self) -> TextTokenizer:
        self._load("textual")
        assert self._textual is not None
        return self._textual[1]

    @property
    def providers(self) -> list[str]:
        return self.visual.providers

    # -- one batch method per tower -----------------------------------------------------------------
    def embed_image_batch(self, pixels: np.ndarray, normalize: bool = True) -> np.ndarray:
        """Embed preprocessed pixels ``(B, 3, S, S)``; the unit every image path goes through."""
        out = _run_batched(self.visual, pixels.astype(np.float32, copy=False))
        return self._finish(out, normalize)

    def embed_token_batch(self, tokens: np.ndarray, normalize: bool = True) -> np.ndarray:
        out = _run_batched(self.textual, tokens)
        return self._finish(out, normalize)

    def _finish(self, out: np.ndarray, normalize: bool) -> np.ndarray:
        out = out.astype(np.float32, copy=False)
        if normalize and not self.bundle.meta.normalized:
            return l2_normalize(out)
        return out

    def probabilities(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        """Probabilities ``(images, texts)`` from unit embeddings, as this model's family defines them."""
        cosines = np.atleast_2d(image_emb) @ np.atleast_2d(text_emb).T
        return self.family.probabilities(cosines, self.logit_scale, self.logit_bias)

    # -- public encoders ---------------------------------------------------------------------------
    def preprocess(self, image: Any, mode: PreprocessMode | None = None) -> np.ndarray:
        """Decode one image (path, bytes, PIL image or array) into model pixels ``(3, S, S)``."""
        from clipworks.imaging import decode

        return decode(image, self.preprocess_cfg, mode or self.preprocess_mode)

    def decode_pixels(self, image: Any, mode: PreprocessMode | None = None) -> np.ndarray:
        """`preprocess` before normalising: uint8 ``(S, S, 3)``, a quarter of the size, for sending elsewhere;
        `to_model_pixels` there gives exactly what `preprocess` gives here."""
        from clipworks.imaging import decode_pixels

        return decode_pixels(image, self.preprocess_cfg, mode or self.preprocess_mode)

    def to_model_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 ``(N, S, S, 3)`` from `decode_pixels` -> the model's float32 ``(N, 3, S, S)``."""
        from clipworks.imaging import to_model_pixels

        cfg = self.preprocess_cfg
        return (
            np.stack([to_model_pixels(p, cfg) for p in pixels])
            if len(pixels)
            else np.zeros((0, 3, *cfg.size), np.float32)
        )

    def encode_images(
        self,
        images: Iterable[Any] | Any,
        batch_size: int = 32,
        normalize: bool = True,
        mode: PreprocessMode | None = None,
    ) -> np.ndarray:
        """Embed images in input order. An unreadable image raises ``BadImage`` naming it.

        One image (a path, bytes or a PIL image) gives a ``(1, D)`` array, as a list of one would: a bare
        string is never iterated as characters. For folders of files with bad ones skipped and decoding in
        threads, use ``clipworks.pipeline``.
        """
        if _is_single_image(images):
            images = [images]
        elif not isinstance(images, Iterable):
            raise TypeError(
                f"encode_images takes an image or an iterable of images (paths, bytes, PIL images, arrays), "
                f"not {type(images).__name__}"
            )
        chunks: list[np.ndarray] = []
        batch: list[np.ndarray] = []
        for image in images:
            batch.append(self.preprocess(image, mode))
            if len(batch) == batch_size:
                chunks.append(self.embed_image_batch(np.stack(batch), normalize))
                batch = []
        if batch:
            chunks.append(self.embed_image_batch(np.stack(batch), normalize))
        if not chunks:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.concatenate(chunks)

    def encode_texts(self, texts: Sequence[str] | str, batch_size: int = 256, normalize: bool = True) -> np.ndarray:
        """Embed texts in input order; batches group prompts of similar length so padding stays short."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        # Families whose towers see the whole row (SigLIP) get full rows; CLIP's are cut to the longest.
        trims = self.family.trims_text_padding and self.profile.trims_text_padding
        full_rows = None if trims else self.bundle.context_length
        fixed_length = self._static_text_length() or full_rows
        tokens = self.tokenizer.encode(texts, pad_to=self.bundle.context_length)
        lengths = (tokens != self.tokenizer.pad_id).sum(axis=1)
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(texts), self.embed_dim), np.float32)
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            width = fixed_length or int(lengths[idx].max())
            out[idx] = self.embed_token_batch(tokens[idx, :width], normalize)
        return out

    def _static_text_length(self) -> int | None:
        """Graphs with a fixed text axis (Immich's, static exports) must get exactly that many tokens."""
        shape = self.textual.input_shape
        return shape[1] if len(shape) > 1 and isinstance(shape[1], int) else None

    def __repr__(self) -> str:
        return f"ClipModel({self.name!r}, precision={self.precision!r}, device={self.device!r})"


def _is_single_image(image: Any) -> bool:
    from PIL import Image

    return isinstance(image, str | bytes | bytearray | os.PathLike | Image.Image)


def _run_batched(session: Session, array: np.ndarray) -> np.ndarray:
    """Run a graph, splitting or padding to its static batch size when it has one (Immich: batch 1)."""
    fixed = session.static_batch
    if fixed is None or len(array) == fixed:
        return session.run(array)
    outs = []
    for start in range(0, len(array), fixed):
        chunk = array[start : start + fixed]
        real = len(chunk)
        if real < fixed:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - real, axis=0)])
        outs.append(session.run(chunk)[:real])
    return np.concatenate(outs)


def load(
    name_or_path: str | Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    *,
    threads: int | None = None,
    preprocess: PreprocessMode = "exact",
    download: bool = True,
    profile: str = "open_clip",
    runtime: RuntimeSettings | None = None,
) -> ClipModel:
    """Load a model by registry name (pulled on first use unless ``download=False``), ``hf-hub:ORG/REPO``,
    ``local-dir:PATH`` or bundle path.

    ``profile="immich"``: vectors as Immich's machine-learning service computes them (``clipworks.profiles``).
    ``runtime`` tunes the backend (threads, spinning, engine caches: ``RuntimeSettings``).
    """
    from clipworks.models.store import ensure_bundle

    bundle = ensure_bundle(name_or_path, download=download)
    return ClipModel(
        bundle,
        device=device,
        precision=precision,
        threads=threads,
        preprocess=preprocess,
        profile=profile,
        runtime=runtime,
    )
