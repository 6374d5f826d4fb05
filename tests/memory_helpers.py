"""Peak memory of a process, from Linux's own accounting, and small files that decode into very large images.

The peak is the high-water mark of the resident set, ``VmHWM`` in ``/proc/PID/status``: read from a running
process (writing 5 to ``/proc/PID/clear_refs`` lowers it to the current RSS, so one step can be measured
alone), or reported by a child itself as it exits (`run_measured`).
"""

from __future__ import annotations

import contextlib
import os
import resource
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

MB = 2**20
# A run that would otherwise take gigabytes (the bug these tests guard against) fails fast with MemoryError
# instead of pushing the test machine into swap: far above what any of these runs needs when it works.
ADDRESS_SPACE_LIMIT = 4 * 2**30


def _status_kb(pid: int | str, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


def rss_mb(pid: int | str = "self") -> float:
    return _status_kb(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int | str = "self") -> float:
    return _status_kb(pid, "VmHWM") / 1024


def reset_peak_rss(pid: int | str = "self") -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@contextlib.contextmanager
def peak_growth_mb() -> Iterator[Callable[[], float]]:
    """In this process: how far the peak RSS rose above the RSS at entry, read after the block."""
    reset_peak_rss()
    start = rss_mb()
    yield lambda: peak_rss_mb() - start


@contextlib.contextmanager
def address_space_headroom(mb: int) -> Iterator[None]:
    """Within the block this process may map at most `mb` MB more than it has now: a regression that would
    take gigabytes raises MemoryError at once instead of swapping. The old limit comes back afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _status_kb("self", "VmSize") * 1024 + mb * MB
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


@dataclass
class Run:
    code: int
    output: str  # stdout and stderr together
    peak_mb: float


# Runs a module or script as __main__ and, at exit, writes the process's own VmHWM (kB) to $PEAK_FILE. The
# child's rusage would not do: ru_maxrss after fork and exec starts at the parent's (pytest's) peak.
_REPORT_PEAK = """\
import atexit, os, runpy, sys
def report():
    status = open('/proc/self/status').read().split('\\n')
    open(os.environ['PEAK_FILE'], 'w').write(next(l for l in status if l.startswith('VmHWM')).split()[1])
atexit.register(report)
target, sys.argv = sys.argv[1], sys.argv[1:]
if target.endswith('.py'):
    runpy.run_path(target, run_name='__main__')
else:
    runpy.run_module(target, run_name='__main__', alter_sys=True)
"""


def run_measured(target: str | os.PathLike[str], *args: str | os.PathLike[str], env: dict[str, str],
                 timeout: float = 120) -> Run:  # fmt: skip
    """Run a module (``clipworks.cli.main``) or a script file in a child Python to its end, with its peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        with (Path(tmp) / "output").open("w+b") as out:
            child = subprocess.Popen(
                [sys.executable, "-c", _REPORT_PEAK, os.fspath(target), *map(os.fspath, args)],
                stdout=out, stderr=subprocess.STDOUT, env={**env, "PEAK_FILE": str(peak_file)},
                preexec_fn=_limit_address_space,
            )  # fmt: skip
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            out.seek(0)
            output = out.read().decode(errors="replace")
        peak = int(peak_file.read_text()) / 1024 if peak_file.exists() else float("nan")
        return Run(child.returncode, output, peak)


def png(path: Path, width: int, height: int, mode: str = "L") -> Path:
    """A real, complete PNG of constant pixels, written row by row: a few hundred kB for 100 megapixels."""
    channels = {"L": (0, 1), "RGB": (2, 3)}[mode]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, channels[0], 0, 0, 0)
    packer = zlib.compressobj(9)
    row = b"\x00" + bytes(width * channels[1])  # filter byte "none", then black pixels
    with path.open("wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr))
        data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
        f.write(_chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
