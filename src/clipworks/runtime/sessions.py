"""The sessions that run a bundle's graphs and the backends they run on.

Every backend is one :class:`Backend` subclass, registered with :func:`register_backend`: the name ``device``
takes (``cuda``, ``tensorrt``), ONNX Runtime's provider, and the session and provider options it builds
from one :class:`RuntimeSettings`. Nothing else in clipworks knows a provider's option names, so a new
accelerator is one new class (docs/ENGINE.md shows the smallest one). Most backends are ONNX Runtime
execution providers; :class:`OpenVINOBackend` runs OpenVINO's own runtime, through the same seam
(:meth:`Backend.open_session`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from clipworks import settings as paths
from clipworks.errors import BadBundle, UsageError
from clipworks.machine import Machine, this_machine

if TYPE_CHECKING:
    import onnxruntime as ort

# Why ONNX Runtime's backends refuse bf16: it has no bf16 CPU kernels for these graphs.
_BF16_ELSEWHERE = "bf16 runs on --device openvino (OpenVINO's CPU plugin, on a CPU with AMX-BF16 or AVX512-BF16)"


class Session(Protocol):
    """One graph with one input and one output, as both towers are, on one backend (thread-safe ``run``)."""

    input_name: str
    input_shape: tuple[int | str | None, ...]
    input_dtype: np.dtype
    providers: list[str]  # what runs it, fastest first (ORT's providers; "OpenVINO:CPU")

    def run(self, array: np.ndarray) -> np.ndarray: ...

    def applied_options(self) -> dict[str, Any]: ...

    @property
    def static_batch(self) -> int | None:
        """The graph's fixed batch size (Immich's graphs: 1), or None when the batch axis is dynamic."""
        ...


def fixed_batch(shape: Sequence[int | str | None]) -> int | None:
    first = shape[0] if shape else None
    return first if isinstance(first, int) else None


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


_CPU_PROVIDER = "CPUExecutionProvider"
# A one-node graph (Relu over one float, data/NOTICE.txt): what ONNX Runtime loads to show whether a provider starts.
_PROBE_GRAPH = Path(__file__).resolve().parent.parent / "data" / "provider_probe.onnx"


_PROBE_LOCK = threading.Lock()  # the probe redirects the process' stdout and stderr: one at a time


@functools.cache
def provider_start_failure(provider: str, options: tuple[tuple[str, str], ...] = ()) -> str | None:
    """Why ONNX Runtime cannot start ``provider`` (with ``options``: the GPU it is given) in this process
    (None: it can), in its own words.

    A GPU build of onnxruntime lists CUDA and TensorRT among its providers on any machine; without an NVIDIA
    driver, CUDA 12 or cuDNN 9 on the library path, a session asked for them quietly runs on the CPU instead
    (ONNX Runtime only logs the missing library). So a backend is tried on a one-node graph before it is
    taken; what ONNX Runtime printed meanwhile is kept for the message, not shown.
    """
    import onnxruntime as ort

    with _PROBE_LOCK, _captured_native_output() as printed, warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        # CUDA and cuDNN from pip (onnxruntime-gpu[cuda,cudnn], or torch's nvidia-* wheels) are not on the
        # loader's path until something loads them; ONNX Runtime's own helper does (a no-op in CPU builds).
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None and provider in {"CUDAExecutionProvider", "TensorrtExecutionProvider"}:
            with contextlib.suppress(Exception):
                preload()
        try:
            session = ort.InferenceSession(str(_PROBE_GRAPH), providers=[(provider, dict(options))])
            ran_on = session.get_providers()[0]
        except Exception as e:  # a provider that fails hard (a bad driver) raises instead of falling back
            ran_on, raised = None, str(e)
        else:
            raised = ""
    if ran_on == provider:
        return None
    said = "\n".join([raised, printed.getvalue(), *(str(w.message) for w in warned)])
    return _first_reason(said) or f"ONNX Runtime ran a test graph on {ran_on or 'nothing'} instead"


def _cuda_of_this_build() -> str:
    """The CUDA this onnxruntime was built for ("CUDA 13.0"; 1.31's wheels moved from 12 to 13)."""
    try:
        from onnxruntime.capi.build_and_package_info import cuda_version  # type: ignore[attr-defined]
    except ImportError:  # CPU builds have no such variable
        return "CUDA"
    return f"CUDA {cuda_version}" if cuda_version else "CUDA"


def _first_reason(text: str) -> str:
    """The one clause of ONNX Runtime's log that says what was missing."""
    for pattern in (r"with error: ([^\n\[]+?)\s*(?:\n|$)", r"(Failed to create \w+)", r"(Specified provider [^.]+)"):
        found = re.search(pattern, text)
        if found:
            return found.group(1).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), "")[:200]


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None under pythonw, or with the descriptor closed at start
            with contextlib.suppress(Exception):
                stream.flush()


@contextlib.contextmanager
def _captured_native_output() -> Iterator[Any]:
    """Collect what C++ code and Python print on file descriptors 1 and 2 meanwhile (``.getvalue()``).
    Where either descriptor is closed (a daemon), nothing is redirected: the log then goes where it goes."""
    import io

    collected = io.StringIO()
    _flush_std()
    saved: list[int] = []
    try:  # copies above 2, so a closed 1 or 2 is never reused for them and then overwritten
        import fcntl

        for fd in (1, 2):
            saved.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3))
    except (ImportError, OSError):  # no fcntl (Windows), or a descriptor closed
        for fd in saved:
            os.close(fd)
        yield collected
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(out):
                yield collected
                collected.write(out.getvalue())
        finally:
            _flush_std()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            collected.write(sink.read().decode("utf-8", "replace"))


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
    # What the provider needs when it will not start ("{cuda}": the CUDA this onnxruntime was built for).
    start_help: ClassVar[str] = "see its requirements in ONNX Runtime's documentation"
    # Precisions this backend computes itself from another precision's graph (bf16 from the fp32 graph).
    derived_precisions: ClassVar[dict[str, str]] = {}
    # Precisions it refuses, and what to do instead.
    refused_precisions: ClassVar[dict[str, str]] = {"bf16": _BF16_ELSEWHERE}

    # The precisions at which ``auto`` takes this backend (where it measured faster than the next); None: all.
    faster_at: ClassVar[frozenset[str] | None] = None

    @classmethod
    def installed(cls, providers: Sequence[str]) -> bool:
        """Whether this backend can run here, given the execution providers this onnxruntime build has."""
        return cls.provider in providers

    @classmethod
    def wanted_by_auto(cls, machine: Machine) -> bool:
        """Whether ``device="auto"`` takes this backend on ``machine`` when it is installed (by rank)."""
        return True

    def start_failure(self) -> str | None:
        """Why this installed backend does not start here on its device (None: it does); asked once per
        process and device."""
        return None if self.provider == _CPU_PROVIDER else provider_start_failure(self.provider, self.probe_options())

    def probe_options(self) -> tuple[tuple[str, str], ...]:
        """The provider options ``start_failure`` tries: those that pick the device, nothing that builds."""
        return ()

    @classmethod
    def refusal(cls, precision: str, machine: Machine) -> str | None:
        """Why this backend does not run ``precision`` on ``machine`` (None: it does)."""
        return cls.refused_precisions.get(precision)

    def graph_precision(self, precision: str) -> str:
        """The bundle graph that ``precision`` runs from on this backend."""
        return self.derived_precisions.get(precision, precision)

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

    @classmethod
    def missing_help(cls, providers: Sequence[str]) -> str:
        """What to install when this backend is asked for but not :meth:`installed`."""
        have = ", ".join(c.name for c in BACKENDS.values() if c.installed(providers))
        return (
            f"needs {cls.provider}, which this onnxruntime build lacks (installed: {have}); "
            "install the matching onnxruntime package (e.g. onnxruntime-gpu) or use device cpu"
        )

    def open_session(self, path: Path, precision: str = "fp32") -> Session:
        """One graph of ``precision`` (its file is ``path``) ready to run on this backend."""
        return OrtSession(path, self)

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
    start_help = (
        "it needs an NVIDIA GPU with its driver, {cuda} and cuDNN 9 (pip install 'onnxruntime-gpu[cuda,cudnn]')"
    )

    def probe_options(self) -> tuple[tuple[str, str], ...]:
        return (("device_id", str(self.device_id())),)  # cuda:1 on a one-GPU machine fails here, not later

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
    probe_options = CudaBackend.probe_options
    start_help = (
        "it needs what device cuda needs and TensorRT 10's libraries on the library path (pip install tensorrt, "
        "then add its tensorrt_libs folder to LD_LIBRARY_PATH); device cuda runs without them"
    )

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
class OpenVINOProviderBackend(Backend):
    """OpenVINO inside ONNX Runtime (the ``onnxruntime-openvino`` package's execution provider)."""

    name = "openvino-ep"
    provider = "OpenVINOExecutionProvider"
    rank = 20
    target_help = "an OpenVINO device (openvino-ep:GPU, openvino-ep:NPU, openvino-ep:CPU)"

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


@register_backend
class OpenVINOBackend(Backend):
    """OpenVINO's own runtime (the ``openvino`` package, extra ``clipworks[openvino]``), CPU by default.

    On a CPU with AMX or AVX-512 VNNI its CPU plugin runs the static int8 graph faster than ONNX Runtime
    runs any int8 graph: 1.5x ORT's dynamic int8 and 1.8x its static int8 on a Sapphire Rapids Xeon, 1.4x
    and 1.8x on a VNNI EPYC (benchmarks/RESULTS.md), so ``auto`` takes it there for int8-static; ``bf16``
    (the fp32 graph run in bf16, cosine 0.99995) is opt-in. Its fp32 runs no faster than ORT's, and on CPUs
    without those units it was not measured: there ``auto`` leaves the work to ``cpu``.
    """

    name = "openvino"
    provider = "OpenVINO"  # not an ORT provider: sessions are OpenVINO's own (``OpenVINOSession``)
    rank = 40
    target_help = "an OpenVINO device (openvino:CPU, openvino:GPU, openvino:NPU)"
    derived_precisions: ClassVar[dict[str, str]] = {"bf16": "fp32"}
    faster_at = frozenset({"int8-static", "bf16"})
    refused_precisions: ClassVar[dict[str, str]] = {
        # The dynamic graph's per-batch quantisation runs as plain ops there: 4x slower than ORT's fused kernel.
        "int8": "dynamic int8 runs about 4x slower on OpenVINO than on ONNX Runtime; use int8-static or bf16 "
        "here, or --device cpu for dynamic int8",
    }
    # OpenVINO's inference precision for each clipworks precision. Its CPU plugin would run the fp32 graph in
    # bf16 on an AMX CPU unless told otherwise, so fp32 is asked for explicitly; static int8 keeps the rest of
    # the graph in f32, as ONNX Runtime does.
    inference_precision: ClassVar[dict[str, str]] = {"fp32": "f32", "bf16": "bf16", "int8-static": "f32", "fp16": "f16"}

    @classmethod
    def installed(cls, providers: Sequence[str]) -> bool:
        import importlib.util

        return importlib.util.find_spec("openvino") is not None

    @classmethod
    def missing_help(cls, providers: Sequence[str]) -> str:
        return "needs the openvino package: pip install 'clipworks[openvino]', or use device cpu"

    def start_failure(self) -> str | None:
        return None  # not an ONNX Runtime provider; provider_options checks the device OpenVINO sees

    @classmethod
    def wanted_by_auto(cls, machine: Machine) -> bool:
        # Measured on both (AVX-VNNI, the 256-bit form on client CPUs, was not): RESULTS.md.
        return any(f in machine.features for f in ("AMX-INT8", "AMX-BF16", "VNNI"))

    @classmethod
    def refusal(cls, precision: str, machine: Machine) -> str | None:
        if precision == "bf16" and not machine.has_bf16_matmul:
            return f"bf16 needs a CPU with AMX-BF16 or AVX512-BF16, and this one has {machine.describe_features()}"
        return super().refusal(precision, machine)

    @property
    def device(self) -> str:
        return (self.target or "CPU").upper()

    def provider_options(self) -> dict[str, str]:
        """The OpenVINO device, checked against those OpenVINO sees here (``GPU`` matches ``GPU.0``)."""
        import openvino as ov

        seen = list(ov.Core().available_devices)
        wanted = self.device.partition(".")[0]
        virtual = {"AUTO", "MULTI", "HETERO"}  # OpenVINO's devices that pick among the real ones
        if wanted not in virtual and self.device not in seen and wanted not in {d.partition(".")[0] for d in seen}:
            raise UsageError(
                f"device {self.name}:{self.target}: OpenVINO sees no {self.device} here (it has {', '.join(seen)})",
                setting="device",
            )
        return {"device": self.device}

    def compile_config(self, precision: str) -> dict[str, Any]:
        """OpenVINO's compile properties for one graph of ``precision``."""
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}  # one stream: one batch at a time, all threads
        hint = self.settings.precision_hint or self.inference_precision.get(precision)
        if hint:
            config["INFERENCE_PRECISION_HINT"] = hint.lower().replace("fp", "f")
        if self.device == "CPU":
            config["INFERENCE_NUM_THREADS"] = self.settings.threads or default_threads()
            # Pinned threads hold their cores; beside image decoders (the pipeline) they must not.
            config["ENABLE_CPU_PINNING"] = self.settings.allow_spinning is not False
        # Compiled graphs are kept between starts: a ViT-B/32 int8 graph compiles in 1.4 s on a 2-core CPU and
        # loads from the cache in 0.18 s (a GPU or NPU compile takes longer still). OpenVINO keys each blob by
        # the graph, the device and these properties, and compiles afresh over a corrupt one.
        config["CACHE_DIR"] = str(self.cache_dir)
        return config

    def open_session(self, path: Path, precision: str = "fp32") -> Session:
        return OpenVINOSession(path, self, precision)


def device_names() -> list[str]:
    """``auto`` then every registered backend, fastest first: what ``device`` accepts (plus ``name:SUFFIX``)."""
    return ["auto", *(cls.name for cls in sorted(BACKENDS.values(), key=lambda c: c.rank))]


def open_backend(
    device: str = "auto",
    settings: RuntimeSettings | None = None,
    *,
    usable: Callable[[type[Backend]], bool] | None = None,
    machine: Machine | None = None,
) -> Backend:
    """The backend ``device`` names: ``auto`` (the fastest installed), ``cpu``, ``cuda``, ``cuda:1``,
    ``tensorrt``, ``openvino``, ``openvino:GPU``, ``coreml``. Refuses one that is not installed.

    ``usable``: for ``auto``, skip backends it says no to (a bundle or precision they cannot run), so
    ``auto`` never picks a backend that would then refuse the work.
    """
    installed = available_providers()
    device = (device or "auto").strip()
    if device.lower() == "auto":
        machine = machine or this_machine()
        ranked = sorted(BACKENDS.values(), key=lambda c: c.rank)
        chosen = next(
            cls
            for cls in ranked
            if cls is CpuBackend
            or (
                cls.installed(installed)
                and cls.wanted_by_auto(machine)
                and (usable is None or usable(cls))
                and cls(settings).start_failure() is None  # a GPU build of onnxruntime on a machine with no GPU
            )
        )
        return chosen(settings)
    kind, _, target = device.partition(":")
    cls = BACKENDS.get(kind.lower())
    if cls is None:
        raise UsageError(
            f"unknown device {device!r}: use {', '.join(device_names())} (cuda:N for a GPU index)", setting="device"
        )
    if not cls.installed(installed):
        raise UsageError(f"device {device!r} {cls.missing_help(installed)}", setting="device")
    backend = cls(settings, target)
    backend.provider_options()  # a bad suffix (cuda:x) fails here, naming the device, not at the first session
    failure = backend.start_failure()
    if failure is not None:
        raise UsageError(
            f"device {device!r}: ONNX Runtime has {cls.provider} but could not start it here ({failure}); "
            f"{cls.start_help.format(cuda=_cuda_of_this_build())}, or use device cpu",
            setting="device",
        )
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
        if self.providers[0] != backend.provider:
            # The provider started on the probe graph (open_backend) but ONNX Runtime gave up on this one.
            raise UsageError(
                f"device {backend.name}: ONNX Runtime would run {self.path} on {self.providers[0]}, not "
                f"{backend.provider} (its log above says why); use device cpu to run it there",
                setting="device",
            )
        self.io_binding = backend.io_binding

    @property
    def static_batch(self) -> int | None:
        return fixed_batch(self.input_shape)

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


def _writable_folder(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


class OpenVINOSession:
    """One graph compiled by OpenVINO; ``run`` is thread-safe (one infer request per concurrent caller)."""

    def __init__(self, path: Path, backend: OpenVINOBackend, precision: str) -> None:
        import queue

        import openvino as ov

        self.path = Path(path)
        self.backend = backend
        self.config = backend.compile_config(precision)
        if not _writable_folder(Path(self.config["CACHE_DIR"])):
            del self.config["CACHE_DIR"]  # a cache that cannot be written only costs the compile each start
        core = ov.Core()
        try:
            # From the path, not a read model: a cached blob then skips reading and transforming the graph.
            self._compiled = core.compile_model(str(self.path), backend.device, self.config)
        except Exception as e:
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise BadBundle(
                f"{self.path} could not be compiled by OpenVINO for {backend.device} ({first[:200]}); "
                "use --device cpu, or re-export the model"
            ) from e
        port = self._compiled.input(0)
        self.input_name = port.get_any_name()
        self.input_shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
        self.input_dtype = np.dtype(port.get_element_type().to_dtype())
        self.providers = [f"OpenVINO:{backend.device}"]
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()  # infer requests not running now

    @property
    def static_batch(self) -> int | None:
        return fixed_batch(self.input_shape)

    def run(self, array: np.ndarray) -> np.ndarray:
        import queue

        array = np.ascontiguousarray(array, dtype=self.input_dtype)
        try:
            request = self._idle.get_nowait()
        except queue.Empty:  # every request is busy in another thread: one more (each holds its own buffers)
            request = self._compiled.create_infer_request()
        try:
            request.infer({0: array}, share_inputs=True)
            return request.get_output_tensor(0).data.copy()  # the request reuses that memory on its next run
        finally:
            self._idle.put(request)

    def applied_options(self) -> dict[str, Any]:
        """What OpenVINO compiled with, read back from the compiled model."""
        applied = {}
        for key in self.config:
            try:
                value = self._compiled.get_property(key)
                applied[key] = value.to_string() if hasattr(value, "to_string") else str(value)  # ov.Type: "f32"
            except Exception:  # a property the device does not report back (CACHE_DIR on some plugins)
                continue
        return {"backend": self.backend.name, "providers": self.providers, "compiled": applied}
