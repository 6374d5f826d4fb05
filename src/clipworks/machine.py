"""What this machine is: the CPU, the features that decide int8/bf16 speed, cores and memory.

Printed with every speed figure (``clipworks bench``, ``benchmarks/``): the same model runs at very
different ratios on an AVX2-only CPU and on one with AVX-512 VNNI or AMX, so a number without them means
little.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

# Display name -> /proc/cpuinfo flag, in the order they matter for ONNX Runtime's int8 and bf16 kernels.
CPU_FEATURES = {
    "AVX2": "avx2",
    "AVX-512": "avx512f",
    "VNNI": "avx512_vnni",
    "AVX-VNNI": "avx_vnni",
    "AMX-INT8": "amx_int8",
    "AMX-BF16": "amx_bf16",
    "AVX512-BF16": "avx512_bf16",
}


@dataclass(frozen=True)
class Machine:
    cpu: str
    features: tuple[str, ...]
    cores: int
    memory_gib: float
    python: str

    @property
    def has_int8_dot_product(self) -> bool:
        """VNNI or AMX: the instructions that make int8 matrix products much faster than fp32."""
        return any(f in self.features for f in ("VNNI", "AVX-VNNI", "AMX-INT8"))

    @property
    def has_bf16_matmul(self) -> bool:
        """AMX-BF16 or AVX512-BF16: bf16 matrix products in hardware (OpenVINO's bf16 inference)."""
        return any(f in self.features for f in ("AMX-BF16", "AVX512-BF16"))

    def describe_features(self) -> str:
        return ", ".join(self.features) or "none of AVX2/AVX-512/VNNI/AMX"

    def describe(self) -> str:
        present = self.describe_features()
        return f"{self.cpu} ({present}), {self.cores} cores, {self.memory_gib:.0f} GiB RAM, Python {self.python}"


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def this_machine() -> Machine:
    cpu, flags = platform.processor() or platform.machine(), set[str]()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux: the model name from platform, features unknown
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and cpu in ("", platform.machine()):
            cpu = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = set(value.split())
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory = 0.0
    features = tuple(name for name, flag in CPU_FEATURES.items() if flag in flags)
    return Machine(cpu, features, usable_cores(), memory, platform.python_version())
