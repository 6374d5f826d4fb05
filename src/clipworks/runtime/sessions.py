"""ONNX Runtime sessions and the backends (execution providers) they run on.

Every backend is one :class:`Backend` subclass, registered with :func:`register_backend`: the name ``device``
takes (``cuda``, ``tensorrt``), ONNX Runtime's provider, and the session and provider options it builds
from one :class:`RuntimeSettings`. Nothing else in clipworks knows a provider's option names, so a new
accelerator is one new class (docs/ENGINE.md shows the smallest one).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from clipworks import settings as paths
from clipworks.errors import BadBundle, UsageError

if TYPE_CHECKING:
    import onnxruntime as ort


class Session(Protocol):
    input_name: str
    input_shape: tuple[int | str | None, ...]
    input_dtype: np.dtype
    providers: list[str]

    def run(self, array: np.ndarray) -> np.ndarray: ...


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class RuntimeSettings:
    """How sessions run, for every backend at once; each backend reads the fields that apply to it.

    ``None`` means "the backend's own default" (spelled out on each field); the defaults are the options
    sessions had before backends were classes, so a caller names only what it changes.
    """

    threads: int | None = None  # intra-op threads (CPU work of any backend); None: every core we may use
    # ORT's pool threads spin between ops, which is fastest alone but steals the cores image decoders need
    # when decoding runs in threads beside the model. None: on, except in the decode -> encode pipeline
    # (``ClipModel.share_cores_with_decoders``), where spinning cost 1.3x the CPU time for no speed (RESULTS.md).
    allow_spinning: bool | None = None
    arena: bool = True  # CPU memory arena: faster reuse of buffers at the price of memory held between runs
    fp16: bool | None = None  # None: on for accelerators (fp16 graphs on CUDA, fp16 kernels in TensorRT)
    io_binding: bool | None = None  # None: on where inputs cross to device memory (CUDA, TensorRT)
    # TensorRT engines and OpenVINO/CoreML compiled models are kept here so a restart does not rebuild them;
    # None: ``<clipworks cache>/engines/<backend>``.
    cache_dir: Path | None = None
    workspace_bytes: int | None = None  # TensorRT's builder workspace; None: ORT's default
    precision_hint: str | None = None  # OpenVINO's inference precision (FP32, FP16, ACCURACY); None: its default


class Backend:
    """One execution provider and the options clipworks gives it. Subclass, set the class variables,
    override :meth:`provider_options` (and :meth:`session_config` if needed), decorate with
    :func:`register_backend`."""

    name: ClassVar[str]  # what ``device`` calls it
    provider: ClassVar[str]  # ONNX Runtime's execution provider
    rank: ClassVar[int]  # ``device="auto"`` takes the installed backend of lowest rank
    accelerator: ClassVar[bool] = False  # fp16 graphs are the fast choice here
    copies_inputs: ClassVar[bool] = False  # inputs cross into device memory (IO binding pays off)
    # Providers tried, in order, for the nodes this one cannot run (kept only where installed).
    fallbacks: ClassVar[tuple[str, ...]] = ("CPUExecutionProvider",)
    target_help: ClassVar[str] = ""  # what may follow "name:" in ``device``; empty: nothing may

    def __init__(self, settings: RuntimeSettings | None = None, target: str = "") -> None:
        self.settings = settings or RuntimeSettings()
        if target and not self.target_help:
            raise UsageError(f"device {self.name}:{target} takes no suffix: use device {self.name}", setting="device")
        self.target = target

    # -- resolved settings ------------------------------------------------------------------------
    @property
    def fp16(self) -> bool:
        return self.accelerator if self.settings.fp16 is None else self.settings.fp16

    @property
    def io_binding(self) -> bool:
        return self.copies_inputs if self.settings.io_binding is None else self.settings.io_binding

    @property
    def cache_dir(self) -> Path:
        return self.settings.cache_dir or paths.cache_dir() / "engines" / self.name

    def device_id(self) -> int:
        """The GPU index of ``name:N`` (0 without a suffix)."""
        if not self.target:
            return 0
        if not self.target.isdigit():
            raise UsageError(
                f"device {self.name}:{self.target}: the suffix must be {self.target_help}", setting="device"
            )
        return int(self.target)

    # -- what ONNX Runtime is given ---------------------------------------------------------------
    def provider_options(self) -> dict[str, str]:
        """This provider's options, as the strings ONNX Runtime parses."""
        return {}

    def session_config(self) -> dict[str, str]:
        """Session configuration entries (``SessionOptions.add_session_config_entry``)."""
        return {"session.intra_op.allow_spinning": _flag(self.settings.allow_spinning is not False, "1", "0")}

    def session_options(self) -> ort.SessionOptions:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.settings.threads or default_threads()
        options.inter_op_num_threads = 1  # one graph runs at a time per session; parallelism is within ops
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_cpu_mem_arena = self.settings.arena
        options.log_severity_level = 3  # ORT warns about unused initialisers in every open_clip graph
        for key, value in self.session_config().items():
            options.add_session_config_entry(key, value)
        return options

    def providers(self, installed: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
        """This provider with its options, then its installed fallbacks with theirs (CPU's: none)."""
        chain = [(self.provider, self.provider_options())]
        for fallback in self.fallbacks:
            if fallback != self.provider and fallback in installed:
                cls = _BY_PROVIDER[fallback]
                # tensorrt:1 falls back to CUDA on the same GPU, not on GPU 0.
                backend = cls(self.settings, self.target if cls.target_help else "")
                chain.append((fallback, backend.provider_options()))
        return chain

    def __repr__(self) -> str:
        suffix = f":{self.target}" if self.target else ""
        return f"{type(self).__name__}({self.name}{suffix})"


BACKENDS: dict[str, type[Backend]] = {}
_BY_PROVIDER: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Make ``cls`` a ``device`` choice (and an ``auto`` candidate by its rank)."""
    BACKENDS[cls.name] = cls
    _BY_PROVIDER.setdefault(cls.provider, cls)  # a variant of a provider never changes how others fall back to it
    return cls


def _flag(on: bool, yes: str = "True", no: str = "False") -> str:
    # ORT parses provider options from strings; Python's True/False is what its own examples pass.
    return yes if on else no


@register_backend
class CpuBackend(Backend):
    name = "cpu"
    provider = "CPUExecutionProvider"
    rank = 100
    fallbacks = ()


@register_backend
class CudaBackend(Backend):
    name = "cuda"
    provider = "CUDAExecutionProvider"
    rank = 10
    accelerator = True
    copies_inputs = True
    target_help = "a GPU index (cuda:1)"

    def provider_options(self) -> dict[str, str]:
        # The arena grows by what a run asks for, not by doubling: towers of different sizes share a GPU.
        return {"device_id": str(self.device_id()), "arena_extend_strategy": "kSameAsRequested"}


@register_backend
class TensorRTBackend(Backend):
    name = "tensorrt"
    provider = "TensorrtExecutionProvider"
    rank = 0
    accelerator = True
    copies_inputs = True
    fallbacks = ("CUDAExecutionProvider", "CPUExecutionProvider")
    target_help = "a GPU index (tensorrt:1)"

    def provider_options(self) -> dict[str, str]:
        cache = str(self.cache_dir)
        options = {
            "device_id": str(self.device_id()),
            "trt_fp16_enable": _flag(self.fp16),
            # Building an engine takes minutes per graph: keep them (and the timing cache) across starts.
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": cache,
        }
        if self.settings.workspace_bytes is not None:
            options["trt_max_workspace_size"] = str(self.settings.workspace_bytes)
        return options


@register_backend
class OpenVINOBackend(Backend):
    name = "openvino"
    provider = "OpenVINOExecutionProvider"
    rank = 20
    target_help = "an OpenVINO device (openvino:GPU, openvino:NPU, openvino:CPU)"

    def provider_options(self) -> dict[str, str]:
        options = {"cache_dir": str(self.cache_dir)}
        if self.target:
            options["device_type"] = self.target.upper()
        if self.settings.precision_hint:
            options["precision"] = self.settings.precision_hint.upper()
        if self.settings.threads:
            options["num_of_threads"] = str(self.settings.threads)
        return options


@register_backend
class CoreMLBackend(Backend):
    name = "coreml"
    provider = "CoreMLExecutionProvider"
    rank = 30

    def provider_options(self) -> dict[str, str]:
        # ML Program is CoreML's format for current Apple chips; compiled models are cached between starts.
        return {"ModelFormat": "MLProgram", "MLComputeUnits": "ALL", "ModelCacheDirectory": str(self.cache_dir)}


def device_names() -> list[str]:
    """``auto`` then every registered backend, fastest first: what ``device`` accepts (plus ``name:SUFFIX``)."""
    return ["auto", *(cls.name for cls in sorted(BACKENDS.values(), key=lambda c: c.rank))]


def open_backend(device: str = "auto", settings: RuntimeSettings | None = None) -> Backend:
    """The backend ``device`` names: ``auto`` (the fastest installed), ``cpu``, ``cuda``, ``cuda:1``,
    ``tensorrt``, ``openvino``, ``openvino:GPU``, ``coreml``. Refuses one this onnxruntime build lacks."""
    installed = available_providers()
    device = (device or "auto").strip()
    if device.lower() == "auto":
        ranked = sorted(BACKENDS.values(), key=lambda c: c.rank)
        return next(cls for cls in ranked if cls.provider in installed or cls is CpuBackend)(settings)
    kind, _, target = device.partition(":")
    cls = BACKENDS.get(kind.lower())
    if cls is None:
        raise UsageError(
            f"unknown device {device!r}: use {', '.join(device_names())} (cuda:N for a GPU index)", setting="device"
        )
    if cls.provider not in installed:
        have = ", ".join(c.name for c in BACKENDS.values() if c.provider in installed)
        raise UsageError(
            f"device {device!r} needs {cls.provider}, which this onnxruntime build lacks (installed: {have}); "
            "install the matching onnxruntime package (e.g. onnxruntime-gpu) or use device cpu",
            setting="device",
        )
    backend = cls(settings, target)
    backend.provider_options()  # a bad suffix (cuda:x) fails here, naming the device, not at the first session
    return backend


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}


class OrtSession:
    """One ONNX graph with one input and one output, as both towers are, on one backend."""

    def __init__(self, path: Path, backend: Backend) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.backend = backend
        providers = backend.providers(available_providers())
        options = backend.session_options()
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as e:
            raise BadBundle(f"{self.path} could not be loaded by ONNX Runtime ({str(e)[:200]}); re-export it") from e
        model_input = self._session.get_inputs()[0]
        self.input_name = model_input.name
        self.input_shape = tuple(model_input.shape)
        self.input_dtype = np.dtype(_ORT_TYPES.get(model_input.type, np.float32))
        self.output_name = self._session.get_outputs()[0].name
        self.providers: list[str] = self._session.get_providers()
        # Bind only when the backend really runs here (ORT fell back to CPU if the provider would not start).
        self.io_binding = backend.io_binding and self.providers[0] == backend.provider

    @property
    def static_batch(self) -> int | None:
        first = self.input_shape[0] if self.input_shape else None
        return first if isinstance(first, int) else None

    def run(self, array: np.ndarray) -> np.ndarray:
        array = np.ascontiguousarray(array, dtype=self.input_dtype)
        if not self.io_binding:
            return self._session.run([self.output_name], {self.input_name: array})[0]
        # The input is copied to the device once, straight from this array, and the output is left where
        # the provider put it until the one copy back; a binding per call keeps concurrent runs apart.
        binding = self._session.io_binding()
        binding.bind_cpu_input(self.input_name, array)
        binding.bind_output(self.output_name)
        self._session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def applied_options(self) -> dict[str, Any]:
        """What ONNX Runtime actually uses, read back from the session (not what was asked for)."""
        options = self._session.get_session_options()
        provider_options = self._session.get_provider_options()
        config = {}
        for key in self.backend.session_config():
            try:
                config[key] = options.get_session_config_entry(key)
            except Exception:  # ORT raises when a key was never set; report what the session has
                continue
        return {
            "backend": self.backend.name,
            "providers": self.providers,
            "provider_options": {p: provider_options.get(p, {}) for p in self.providers},
            "intra_op_threads": options.intra_op_num_threads,
            "inter_op_threads": options.inter_op_num_threads,
            "cpu_arena": options.enable_cpu_mem_arena,
            "session_config": config,
            "io_binding": self.io_binding,
        }
