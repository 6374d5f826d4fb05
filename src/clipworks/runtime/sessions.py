"""ONNX Runtime sessions behind a small protocol, with one ordered provider preference.

A new accelerator is a new entry in ``PROVIDERS`` (or a new ``Session`` class), not edits elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from clipworks.errors import BadBundle, UsageError

# Fastest first; "auto" takes every installed one in this order, CPU always last as the fallback.
PROVIDERS: tuple[tuple[str, str], ...] = (
    ("tensorrt", "TensorrtExecutionProvider"),
    ("cuda", "CUDAExecutionProvider"),
    ("openvino", "OpenVINOExecutionProvider"),
    ("coreml", "CoreMLExecutionProvider"),
    ("cpu", "CPUExecutionProvider"),
)
GPU_PROVIDERS = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}


class Session(Protocol):
    input_name: str
    input_shape: tuple[int | str | None, ...]
    input_dtype: np.dtype
    providers: list[str]

    def run(self, array: np.ndarray) -> np.ndarray: ...


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_providers(device: str = "auto") -> list[str | tuple[str, dict[str, object]]]:
    """Map ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``tensorrt``, ``openvino`` or ``coreml`` to providers."""
    installed = available_providers()
    device = (device or "auto").lower()
    if device == "auto":
        return [full for _, full in PROVIDERS if full in installed]
    kind, _, index = device.partition(":")
    names = dict(PROVIDERS)
    if kind not in names:
        raise UsageError(f"unknown device {device!r}: use auto, {', '.join(names)} (cuda:N for a GPU index)")
    full = names[kind]
    if full not in installed:
        have = ", ".join(short for short, f in PROVIDERS if f in installed)
        raise UsageError(
            f"device {device!r} needs {full}, which this onnxruntime build lacks (installed: {have}); "
            "install the matching onnxruntime package (e.g. onnxruntime-gpu) or use --device cpu"
        )
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    options: dict[str, object] = {"device_id": int(index)} if index else {}
    return [(full, options), "CPUExecutionProvider"]


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}


@dataclass
class OrtSession:
    """One ONNX graph with one input and one output, as both towers are."""

    path: Path
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads or default_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # ORT warns about unused initialisers in every open_clip graph
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=choose_providers(self.device))
        except UsageError:
            raise
        except Exception as e:
            raise BadBundle(f"{self.path} could not be loaded by ONNX Runtime ({str(e)[:200]}); re-export it") from e
        model_input = self._session.get_inputs()[0]
        self.input_name = model_input.name
        self.input_shape = tuple(model_input.shape)
        self.input_dtype = np.dtype(_ORT_TYPES.get(model_input.type, np.float32))
        self.output_name = self._session.get_outputs()[0].name
        self.providers = self._session.get_providers()

    @property
    def static_batch(self) -> int | None:
        first = self.input_shape[0] if self.input_shape else None
        return first if isinstance(first, int) else None

    def run(self, array: np.ndarray) -> np.ndarray:
        feed = {self.input_name: np.ascontiguousarray(array, dtype=self.input_dtype)}
        return self._session.run([self.output_name], feed)[0]
