"""Export and import: Sophgo pkl, npy, Parquet and Horizon's ClipItems database, with dimension checks."""

from __future__ import annotations

import pickle
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from clipworks.cli.main import main
from clipworks.errors import ClipworksError
from clipworks.library import Library
from library_helpers import make_variants, stored_vectors

ROBOT_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS ClipItems (id INTEGER PRIMARY KEY AUTOINCREMENT, timestamp INTEGER, type BOOLEAN, "
    "name TEXT, text TEXT, url TEXT, feature BLOB, extra TEXT);"
)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory, photos: list[Path], vit_bundle: Path) -> Path:
    root = tmp_path_factory.mktemp("lib")
    folder = root / "photos"
    folder.mkdir()
    for p in photos:
        shutil.copy(p, folder / p.name)
    make_variants(photos, folder, 4)
    Library(root / "lib.db", str(vit_bundle), create=True).index([folder])
    return root / "lib.db"


# ClipItems (.db) holds 512-d vectors only, which the tiny bundle does not make: tests/test_robot_compat.py.
@pytest.mark.parametrize("suffix", [".pkl", ".npy", ".parquet"])
def test_export_import_round_trip(tmp_path: Path, indexed: Path, vit_bundle: Path, suffix: str, capsys):
    out = tmp_path / f"exported{suffix}"
    assert main(["index", "export", str(out), "--db", str(indexed)]) == 0
    assert "exported" in capsys.readouterr().err
    fresh = tmp_path / "fresh.db"
    assert main(["index", "import", str(out), "--db", str(fresh), "--model", str(vit_bundle)]) == 0
    original, imported = stored_vectors(indexed), stored_vectors(fresh)
    assert set(imported) == set(original)
    for path, vector in original.items():
        np.testing.assert_allclose(imported[path], vector, atol=1e-6)
    # The imported library searches like the original, and a later index run trusts the imported vectors.
    assert Library(fresh).search("a dog") == Library(indexed).search("a dog")
    folder = Path(next(iter(original))).parent
    report = Library(fresh).index([folder])
    assert report.embedded == 0 and report.unchanged == len(original)


def test_sophgo_pkl_format(tmp_path: Path, indexed: Path):
    out = tmp_path / "embeddings.pkl"
    Library(indexed).export(out)
    data = pickle.loads(out.read_bytes())
    assert set(data) == {"img_path", "embedding"}
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 and v.shape == (32,) for v in data["embedding"])
    vectors = stored_vectors(indexed)
    for path, vector in zip(data["img_path"], data["embedding"], strict=True):
        np.testing.assert_array_equal(vector, vectors[path])


def test_import_robot_clipitems_database(tmp_path: Path, photos: list[Path], vit_bundle: Path):
    robot = tmp_path / "clip.db"
    conn = sqlite3.connect(robot)
    conn.execute(ROBOT_SCHEMA)
    rng = np.random.default_rng(0)
    features = rng.standard_normal((3, 32)).astype(np.float32)
    for i, p in enumerate(photos[:3]):
        conn.execute(
            "INSERT INTO ClipItems VALUES (NULL, 1, 1, ?, '', ?, ?, 'a,b')", (p.name, str(p), features[i].tobytes())
        )
    conn.execute("INSERT INTO ClipItems VALUES (NULL, 1, 0, 'q', 'a dog', '', ?, '')", (features[0].tobytes(),))
    conn.commit()
    conn.close()
    lib = Library(tmp_path / "lib.db", str(vit_bundle), create=True)
    assert lib.import_file(robot).imported == 3  # the text row (type 0) is not an image
    vectors = stored_vectors(tmp_path / "lib.db")
    assert set(vectors) == {str(p) for p in photos[:3]}
    for i, p in enumerate(photos[:3]):
        np.testing.assert_allclose(vectors[str(p)], features[i] / np.linalg.norm(features[i]), atol=1e-6)
    hits = lib.similar(photos[0], top_k=1)
    expected = max(range(1, 3), key=lambda i: float(features[0] @ features[i] / np.linalg.norm(features[i])))
    assert hits[0].path == str(photos[expected])


@pytest.mark.parametrize("suffix", [".pkl", ".db"])
def test_import_refuses_dimension_mismatch(tmp_path: Path, photos: list[Path], vit_bundle: Path, suffix, capsys):
    wrong = np.ones((2, 512), np.float32)
    path = tmp_path / f"wrong{suffix}"
    if suffix == ".pkl":
        path.write_bytes(pickle.dumps({"img_path": [str(p) for p in photos[:2]], "embedding": list(wrong)}))
    else:
        conn = sqlite3.connect(path)
        conn.execute(ROBOT_SCHEMA)
        conn.executemany(
            "INSERT INTO ClipItems (type, url, feature) VALUES (1, ?, ?)",
            [(str(p), wrong[0].tobytes()) for p in photos[:2]],
        )
        conn.commit()
        conn.close()
    db = tmp_path / "lib.db"
    with pytest.raises(ClipworksError, match="512-d embeddings but tiny-vit::random makes 32-d"):
        Library(db, str(vit_bundle), create=True).import_file(path)
    assert main(["index", "import", str(path), "--db", str(db), "--model", str(vit_bundle)]) == 1
    assert "512-d" in capsys.readouterr().err
    assert stored_vectors(db) == {}
