"""Pickles clipworks writes load under numpy 1.x: 1.26 (video_features' pin) and 1.24 (the newest numpy for
Python 3.8, which Sophgo boards run).

numpy 2 pickles arrays through ``numpy._core``; numpy 1.26 carries a stub of it for such files, 1.24 and
older do not. The files here are written by the real writers (``embed images``' ``.pkl``, ``video
--on-extraction save_pickle``) and read by a second Python process with only that numpy on its path.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipworks.outputs import PICKLE_PROTOCOL, read_embeddings, write_embeddings
from clipworks.video.features import VideoFeatures
from clipworks.video.outputs import feature_files, load_features, save_features

# Prints each pickle's content as JSON: arrays as {dtype, shape, values}, so exact values can be compared.
READER = r"""
import json, pickle, sys
import numpy
assert numpy.__version__.startswith("1."), numpy.__version__

def plain(x):
    if isinstance(x, numpy.ndarray):
        return {"dtype": x.dtype.str, "shape": list(x.shape), "values": x.ravel().tolist(),
                "writeable": bool(x.flags.writeable)}
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [plain(v) for v in x]
    return x

out = {}
for path in sys.argv[1:]:
    with open(path, "rb") as fh:
        out[path] = plain(pickle.load(fh))
print(json.dumps({"numpy": numpy.__version__, "files": out}))
"""


NUMPY1_VERSIONS = ("1.24.4", "1.26.4")


@pytest.fixture(scope="session")
def numpy1_pythons(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Per numpy 1.x version: this interpreter with only that numpy on its path (-S: no site-packages,
    -E: no PYTHONPATH). Installed once per session from the package registry (about 10 s each)."""
    pythons = {}
    for version in NUMPY1_VERSIONS:
        target = tmp_path_factory.mktemp(f"numpy-{version}")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
             "--target", str(target), f"numpy=={version}"],
            check=True, timeout=300,
        )  # fmt: skip
        code = f"import sys; sys.path.insert(0, {str(target)!r}); exec({READER!r})"
        pythons[version] = [sys.executable, "-E", "-S", "-c", code]
    return pythons


@pytest.fixture(params=NUMPY1_VERSIONS)
def numpy1_python(request, numpy1_pythons) -> tuple[str, list[str]]:
    return request.param, numpy1_pythons[request.param]


def read_in_numpy1(python: tuple[str, list[str]], *files: Path) -> dict:
    version, command = python
    done = subprocess.run([*command, *map(str, files)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["numpy"] == version
    return result["files"]


def as_array(record: dict) -> np.ndarray:
    return np.array(record["values"], dtype=record["dtype"]).reshape(record["shape"])


def test_numpy2s_own_pickle_fails_under_numpy_1_24(numpy1_pythons, tmp_path) -> None:
    """The premise: numpy 2's plain pickle does not load under 1.24, so the tests below prove the writer."""
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(np.zeros(3, np.float32), protocol=PICKLE_PROTOCOL))
    done = subprocess.run([*numpy1_pythons["1.24.4"], str(plain)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "numpy._core" in done.stderr


def test_embeddings_pkl_loads_in_numpy1_and_round_trips(numpy1_python, tmp_path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3, 640)).astype(np.float32)
    paths = ["a.jpg", "dir/b c.png", "d\u00e9j\u00e0.jpg"]
    out = tmp_path / "embeddings.pkl"
    write_embeddings(out, paths, vectors)

    assert out.read_bytes()[:2] == b"\x80\x04"  # protocol 4, as Python 3.8 and Sophgo's writer use
    loaded = read_in_numpy1(numpy1_python, out)[str(out)]
    assert loaded["img_path"] == paths
    assert [r["dtype"] for r in loaded["embedding"]] == ["<f4"] * 3
    got = np.stack([as_array(r) for r in loaded["embedding"]])
    assert np.array_equal(got, vectors)
    assert all(r["writeable"] for r in loaded["embedding"])  # a user may normalise them in place

    back_paths, back = read_embeddings(out)  # and numpy 2 still reads its own file
    assert back_paths == paths and np.array_equal(back, vectors)


def test_video_features_pickles_load_in_numpy1_and_round_trip(numpy1_python, tmp_path) -> None:
    rng = np.random.default_rng(1)
    feats = VideoFeatures(Path("clip.mp4"), rng.standard_normal((4, 32)).astype(np.float32),
                          np.array([0.0, 33.0, 66.0, 200.0]), 15.030530765617661)  # fmt: skip
    save_features(feats, tmp_path, "save_pickle")
    files = feature_files(tmp_path, feats.path, "save_pickle")

    loaded = read_in_numpy1(numpy1_python, *files)
    clip, fps, stamps = (loaded[str(f)] for f in files)
    # video_features' own dtypes and shapes: float64 (T, D) features, a 0-d fps, (T,) timestamps.
    assert (clip["dtype"], clip["shape"]) == ("<f8", [4, 32])
    assert np.array_equal(as_array(clip), feats.embeddings.astype(np.float64))
    assert (fps["dtype"], fps["shape"], fps["values"]) == ("<f8", [], [15.030530765617661])
    assert (stamps["dtype"], stamps["values"]) == ("<f8", [0.0, 33.0, 66.0, 200.0])

    back = load_features(tmp_path, feats.path)
    assert back is not None and back.fps == feats.fps
    assert np.array_equal(back.embeddings, feats.embeddings) and np.array_equal(back.timestamps_ms, feats.timestamps_ms)
