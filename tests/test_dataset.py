"""``clipworks embed dataset``: WebDataset tars, tables and folders in; clip-retrieval's layout out, read back
as autofaiss and clip-retrieval read it (``np.load`` of each ``img_emb_{i}.npy``, the metadata Parquet files
in the same order), resumed after a crash, with bad samples recorded instead of ending the job."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import clipworks
from clipworks.cli.main import main
from clipworks.dataset import embed_dataset, expand_braces, resolve_inputs
from clipworks.errors import UsageError
from clipworks.outputs import METADATA_COLUMNS, NpyRows

# fp16 keeps 11 bits: unit vectors' components come back within this of the float32 encoder's
FP16_ATOL = 2e-3


@pytest.fixture(scope="module")
def model(vit_bundle):
    return clipworks.load(vit_bundle)


def jpeg(i: int) -> bytes:
    """A small JPEG, different for every ``i`` (size too, so width/height are checked)."""
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 255, (20 + i % 7, 24 + i % 5, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def caption(i: int) -> str:
    return f"a photo of thing number {i}"


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[tuple[str, bytes, bytes | None]]) -> Path:
    """A tar as webdataset's TarWriter writes one: KEY.jpg, KEY.txt and KEY.json, consecutive per sample."""
    with tarfile.open(path, "w") as tar:
        for key, image, text in samples:
            add_member(tar, f"{key}.jpg", image)
            if text is not None:
                add_member(tar, f"{key}.txt", text)
            add_member(tar, f"{key}.json", json.dumps({"key": key}).encode())
    return path


def shards(folder: Path, counts: list[int]) -> list[list[int]]:
    """``folder/0000{n}.tar`` with ``counts[n]`` samples each; the sample numbers of each shard."""
    folder.mkdir(parents=True, exist_ok=True)
    numbers, start = [], 0
    for n, count in enumerate(counts):
        ids = list(range(start, start + count))
        write_shard(folder / f"{n:05d}.tar", [(f"{i:09d}", jpeg(i), caption(i).encode()) for i in ids])
        numbers.append(ids)
        start += count
    return numbers


def read_layout(folder: Path, text: bool = False) -> tuple[np.ndarray, pa.Table, np.ndarray | None]:
    """What autofaiss and clip-retrieval read: the sorted npy files concatenated, the parquet files likewise."""
    images = [np.load(f) for f in sorted(glob.glob(str(folder / "img_emb" / "*.npy")))]
    metadata = pa.concat_tables(pq.read_table(f) for f in sorted(glob.glob(str(folder / "metadata" / "*.parquet"))))
    texts = [np.load(f) for f in sorted(glob.glob(str(folder / "text_emb" / "*.npy")))] if text else None
    return np.concatenate(images), metadata, np.concatenate(texts) if texts else None


def run(capsys, *args: object) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_webdataset_brace_pattern_gives_clip_retrievals_layout(capsys, model, vit_bundle, tmp_path) -> None:
    numbers = shards(tmp_path / "shards", [3, 2, 2])
    out = tmp_path / "out"
    pattern = tmp_path / "shards" / "{00000..00002}.tar"
    code, err = run(capsys, "embed", "dataset", pattern, "--output-folder", out, "--enable-text",
                    "--shard-size", 4, "-m", vit_bundle, "--batch-size", 3)  # fmt: skip
    assert code == 0, err
    assert sorted(os.listdir(out / "img_emb")) == ["img_emb_00000.npy", "img_emb_00001.npy"]
    assert sorted(os.listdir(out / "text_emb")) == ["text_emb_00000.npy", "text_emb_00001.npy"]
    assert sorted(os.listdir(out / "metadata")) == ["metadata_00000.parquet", "metadata_00001.parquet"]
    assert [len(np.load(out / "img_emb" / f"img_emb_0000{i}.npy")) for i in (0, 1)] == [4, 3]
    images, metadata, texts = read_layout(out, text=True)
    ids = [i for shard in numbers for i in shard]
    assert images.dtype == np.float16 and texts is not None and texts.dtype == np.float16
    np.testing.assert_allclose(images, model.encode_images([jpeg(i) for i in ids]), atol=FP16_ATOL)
    np.testing.assert_allclose(texts, model.encode_texts([caption(i) for i in ids]), atol=FP16_ATOL)
    assert tuple(metadata.column_names) == METADATA_COLUMNS
    rows = metadata.to_pylist()
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in ids]
    assert [r["image_path"] for r in rows] == [f"{i:09d}" for i in ids]  # clip-retrieval records the key
    assert [r["caption"] for r in rows] == [caption(i) for i in ids]
    assert [(r["width"], r["height"]) for r in rows] == [Image.open(io.BytesIO(jpeg(i))).size for i in ids]
    assert json.loads((out / "job.json").read_text())["model"] == model.name


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("s/{00000..00002}.tar", ["s/00000.tar", "s/00001.tar", "s/00002.tar"]),
        ("s/{8..11}.tar", ["s/8.tar", "s/9.tar", "s/10.tar", "s/11.tar"]),
        ("s/{098..100}.tar", ["s/098.tar", "s/099.tar", "s/100.tar"]),
        ("{a,b}/{0..1}.tar", ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]),
        ("plain.tar", ["plain.tar"]),
        ("odd{name}.tar", ["odd{name}.tar"]),
    ],
)
def test_brace_patterns(pattern: str, expected: list[str]) -> None:
    assert expand_braces(pattern) == expected


def write_table(folder: Path, kind: str, rows: list[dict[str, str]]) -> Path:
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), folder / "table.parquet")
        return folder / "table.parquet"
    with (folder / "table.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder / "table.csv"


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_tables_of_paths_with_captions(model, kind: str, tmp_path) -> None:
    (tmp_path / "img").mkdir()
    for i in range(5):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(i))
    # relative to the table, and absolute
    rows = [{"url": f"img/{i}.jpg" if i % 2 else str(tmp_path / "img" / f"{i}.jpg"), "caption": caption(i)}
            for i in range(5)]  # fmt: skip
    table = write_table(tmp_path, kind, rows)
    paths, fmt = resolve_inputs([str(table)], None)
    result = embed_dataset(model, paths, fmt, tmp_path / "out", enable_text=True, shard_size=3)
    assert (result.embedded, result.failed, result.shards_written) == (5, 0, [0, 1])
    images, metadata, texts = read_layout(tmp_path / "out", text=True)
    np.testing.assert_allclose(images, model.encode_images([jpeg(i) for i in range(5)]), atol=FP16_ATOL)
    np.testing.assert_allclose(texts, model.encode_texts([caption(i) for i in range(5)]), atol=FP16_ATOL)
    assert metadata["caption"].to_pylist() == [caption(i) for i in range(5)]
    assert metadata["image_path"].to_pylist() == [os.path.join(str(tmp_path), r["url"]) for r in rows]


def test_fsspec_urls_read_shards_and_tables(model, tmp_path) -> None:
    """file:// goes through fsspec as s3:// or gs:// would: brace patterns, tars, tables of image URLs."""
    shards(tmp_path / "shards", [2, 1])
    paths, fmt = resolve_inputs([f"file://{tmp_path}/shards/{{00000..00001}}.tar"], None)
    assert (paths, fmt) == (
        [f"file://{tmp_path}/shards/00000.tar", f"file://{tmp_path}/shards/00001.tar"],
        "webdataset",
    )
    assert embed_dataset(model, paths, fmt, tmp_path / "wds").embedded == 3
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(i))
    table = write_table(
        tmp_path, "csv", [{"url": f"file://{tmp_path}/img/{i}.jpg", "caption": caption(i)} for i in range(3)]
    )
    paths, fmt = resolve_inputs([f"file://{table}"], None)
    embed_dataset(model, paths, fmt, tmp_path / "table")
    for out in ("wds", "table"):
        images, metadata, _ = read_layout(tmp_path / out)
        np.testing.assert_allclose(images, model.encode_images([jpeg(i) for i in range(3)]), atol=FP16_ATOL)
    assert metadata["image_path"].to_pylist() == [f"file://{tmp_path}/img/{i}.jpg" for i in range(3)]


def test_folders_pair_images_with_txt_captions(model, tmp_path) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    names = ["a", "b", "sub/c"]
    for i, name in enumerate(names):
        (folder / f"{name}.jpg").write_bytes(jpeg(i))
        (folder / f"{name}.txt").write_text(caption(i) + "\n")
    result = embed_dataset(model, [str(folder)], "files", tmp_path / "out", enable_text=True)
    assert result.embedded == 3
    images, metadata, texts = read_layout(tmp_path / "out", text=True)
    assert metadata["key"].to_pylist() == names
    np.testing.assert_allclose(images, model.encode_images([jpeg(i) for i in range(3)]), atol=FP16_ATOL)
    np.testing.assert_allclose(texts, model.encode_texts([caption(i) for i in range(3)]), atol=FP16_ATOL)


BAD_SAMPLES = [
    pytest.param(b"\xff\xd8\xff\xe0 not a jpeg", b"fine caption", "001 in", id="corrupt-image"),
    pytest.param(b"", b"fine caption", "001 in", id="empty-image"),
    pytest.param(b"GIF89a" + bytes(40), b"fine caption", "001 in", id="broken-gif"),
    pytest.param(None, b"\xff\xfe caption", "not UTF-8", id="caption-not-utf8"),
]


@pytest.mark.parametrize(("image", "text", "reason"), BAD_SAMPLES)
def test_a_bad_sample_is_recorded_in_errors_not_the_end_of_the_job(model, tmp_path, image, text, reason) -> None:
    samples = [(f"{i:03d}", jpeg(i), caption(i).encode()) for i in range(4)]
    samples[1] = ("001", image if image is not None else jpeg(1), text)
    write_shard(tmp_path / "s.tar", samples)
    result = embed_dataset(model, [str(tmp_path / "s.tar")], "webdataset", tmp_path / "out", enable_text=True)
    assert (result.embedded, result.failed) == (3, 1)
    images, metadata, _ = read_layout(tmp_path / "out", text=True)
    assert metadata["key"].to_pylist() == ["000", "002", "003"]
    np.testing.assert_allclose(images, model.encode_images([jpeg(i) for i in (0, 2, 3)]), atol=FP16_ATOL)
    errors = pq.read_table(tmp_path / "out" / "errors" / "errors_00000.parquet").to_pylist()
    assert [e["key"] for e in errors] == ["001"]
    assert reason in errors[0]["error"] and "s.tar" in errors[0]["error"] and "\n" not in errors[0]["error"]


def test_missing_caption_with_enable_text_is_an_error_row(model, tmp_path) -> None:
    write_shard(tmp_path / "s.tar", [("a", jpeg(0), b"cap"), ("b", jpeg(1), None)])
    result = embed_dataset(model, [str(tmp_path / "s.tar")], "webdataset", tmp_path / "out", enable_text=True)
    assert (result.embedded, result.failed) == (1, 1)
    errors = pq.read_table(tmp_path / "out" / "errors" / "errors_00000.parquet").to_pylist()
    assert errors[0]["key"] == "b" and "no caption" in errors[0]["error"]


@pytest.mark.parametrize("gzip", [False, True])
def test_a_truncated_tar_keeps_its_readable_samples(capsys, model, tmp_path, gzip: bool) -> None:
    shards(tmp_path / "shards", [6])
    full = (tmp_path / "shards" / "00000.tar").read_bytes()
    name = "cut.tar.gz" if gzip else "cut.tar"
    if gzip:
        import gzip as gz

        full = gz.compress(full)
    (tmp_path / name).write_bytes(full[: int(len(full) * 0.6)])
    result = embed_dataset(model, [str(tmp_path / name)], "webdataset", tmp_path / "out")
    err = capsys.readouterr().err
    assert 1 <= result.embedded < 6 and result.failed == 0
    _, metadata, _ = read_layout(tmp_path / "out")
    assert metadata["key"].to_pylist() == [f"{i:09d}" for i in range(result.embedded)]
    lines = [line for line in err.splitlines() if "truncated" in line]
    assert len(lines) == 1 and name in lines[0] and f"after {result.embedded} samples" in lines[0]


def test_resume_after_a_crash_skips_finished_shards(model, tmp_path) -> None:
    shards(tmp_path / "shards", [3, 2])
    inputs = [str(tmp_path / "shards" / "{00000..00001}.tar")]
    paths, fmt = resolve_inputs(inputs, None)
    out = tmp_path / "out"
    seen = 0

    def crash_on_the_fourth(n: int) -> None:  # the 4th sample: shard 0 is written, shard 1 half full
        nonlocal seen
        seen += n
        if seen == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_dataset(model, paths, fmt, out, shard_size=2, batch_size=1, workers=1, on_progress=crash_on_the_fourth)
    finished = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert finished == ["errors/errors_00000.parquet", "img_emb/img_emb_00000.npy", "job.json",
                        "metadata/metadata_00000.parquet"]  # fmt: skip  # no shard 1 file, no temporary file
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*_00000.*")}

    read_again: list[int] = []
    result = embed_dataset(model, paths, fmt, out, shard_size=2, on_progress=read_again.append)
    assert result.shards_skipped == [0] and result.shards_written == [1, 2]
    assert sum(read_again) == 3  # shard 0's samples were not decoded again
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    images, metadata, _ = read_layout(out)
    assert metadata["key"].to_pylist() == [f"{i:09d}" for i in range(5)]
    np.testing.assert_allclose(images, model.encode_images([jpeg(i) for i in range(5)]), atol=FP16_ATOL)


def test_an_output_folder_of_another_model_or_setting_is_refused(model, rn_bundle, tmp_path) -> None:
    shards(tmp_path / "shards", [2])
    paths = [str(tmp_path / "shards" / "00000.tar")]
    embed_dataset(model, paths, "webdataset", tmp_path / "out")
    before = (tmp_path / "out" / "img_emb" / "img_emb_00000.npy").read_bytes()
    with pytest.raises(UsageError, match="model"):
        embed_dataset(clipworks.load(rn_bundle), paths, "webdataset", tmp_path / "out")
    with pytest.raises(UsageError, match="shard_size"):
        embed_dataset(model, paths, "webdataset", tmp_path / "out", shard_size=7)
    assert (tmp_path / "out" / "img_emb" / "img_emb_00000.npy").read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{dir}/nothing.tar"], "nothing.tar does not exist"),
        (["{dir}/shards/{{00000..00003}}.tar"], "00001.tar does not exist"),
        (["{dir}/shards/00000.tar", "--engine", "spark"], "--engine must be one of local, ray, not 'spark'"),
        (["{dir}/shards/00000.tar", "--address", "auto"], "--address, --actors and --gpus-per-actor are for --engine"),
        (["{dir}/shards/00000.tar", "--input-format", "zip"], "--input-format must be one of"),
        (["{dir}/readme.md"], "cannot tell the format"),
        (["{dir}/shards/00000.tar", "--shard-size", "0"], "--shard-size must be at least 1"),
        (["s3://clipworks-test-bucket/{{0..1}}.tar"], "s3fs"),  # the s3 filesystem package is not installed
        (["hdfs://namenode/shards/0.tar"], "cannot read hdfs://namenode/shards/0.tar"),  # no Java here
        (["nosuch://x/0.tar"], "Protocol not known"),
    ],
)
def test_bad_invocations_get_one_line(capsys, vit_bundle, tmp_path, args, message) -> None:
    shards(tmp_path / "shards", [1])
    (tmp_path / "readme.md").write_text("hi")
    code, err = run(capsys, "embed", "dataset", *[a.format(dir=tmp_path) for a in args],
                    "--output-folder", tmp_path / "out", "-m", vit_bundle)  # fmt: skip
    assert code != 0
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("rows", [0, 1, 5, 12345678901])
def test_npy_rows_header_reads_back_with_numpy(tmp_path, rows: int) -> None:
    path = tmp_path / "a.npy"
    writer = NpyRows(path, 3, np.float16)
    data = np.arange(min(rows, 5) * 3, dtype=np.float16).reshape(-1, 3)
    writer.append(data)
    writer.rows = rows  # the header must fit any count (the data need not, for this check)
    writer.close()
    with path.open("rb") as fh:
        assert np.lib.format.read_magic(fh) == (1, 0)
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        assert fh.tell() % 64 == 0  # numpy's own alignment
    assert shape == (rows, 3) and dtype == np.float16
    if rows <= 5:
        np.testing.assert_array_equal(np.load(path), data)


def big_jpeg(i: int) -> bytes:
    """About 60 kB (noise does not compress): a run that held every sample's bytes would show in its peak."""
    pixels = np.random.default_rng(i).integers(0, 255, (160, 160, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_memory_stays_bounded_as_the_dataset_grows(vit_bundle, tmp_path) -> None:
    from memory_helpers import run_measured

    src = str(Path(clipworks.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    pool = [big_jpeg(i) for i in range(50)]
    peaks = {}
    for count in (100, 1000):  # 1000 samples: 60 MB of JPEG bytes, 50 MB of decoded pixels
        tar = write_shard(tmp_path / f"{count}.tar", [(f"{i:06d}", pool[i % 50], b"cap") for i in range(count)])
        run = run_measured("clipworks.cli.main", "embed", "dataset", tar, "--output-folder", tmp_path / f"out{count}",
                           "-m", vit_bundle, "--shard-size", "300", "--enable-text", env=env, timeout=600)  # fmt: skip
        assert run.code == 0, run.output
        assert len(pq.read_table(tmp_path / f"out{count}" / "metadata").to_pylist()) == count
        peaks[count] = run.peak_mb
    print(f"peak RSS: 100 samples {peaks[100]:.0f} MB, 1000 samples {peaks[1000]:.0f} MB")
    assert peaks[1000] - peaks[100] < 25


STREAM_VECTORS = """
import sys
import numpy as np
from clipworks.outputs import EmbeddingWriter
out, batches = sys.argv[1], int(sys.argv[2])
batch = np.random.default_rng(0).standard_normal((1000, 256)).astype(np.float32)  # 1 MB a batch
with EmbeddingWriter(out, 256) as writer:
    for b in range(batches):
        writer.add([f"{b}/{i}.jpg" for i in range(1000)], batch)
    writer.close()
"""


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_embedding_files_stream_batches_to_disk(tmp_path, suffix: str) -> None:
    """``embed images`` into .npy/.parquet holds the names, not the vectors: 200 MB more of them cost no 200 MB."""
    from clipworks.outputs import read_embeddings
    from memory_helpers import run_measured

    script = tmp_path / "stream.py"
    script.write_text(STREAM_VECTORS)
    src = str(Path(clipworks.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    peaks = {}
    for batches in (50, 250):
        run = run_measured(script, tmp_path / f"e{batches}{suffix}", str(batches), env=env)
        assert run.code == 0, run.output
        peaks[batches] = run.peak_mb
    print(f"{suffix}: peak {peaks[50]:.0f} MB for 50 MB of vectors, {peaks[250]:.0f} MB for 250 MB")
    assert peaks[250] - peaks[50] < 40  # the 200000 more names (about 15 MB as Python strings) and noise
    paths, vectors = read_embeddings(tmp_path / f"e250{suffix}")
    assert len(paths) == 250_000 and paths[1001] == "1/1.jpg"
    np.testing.assert_array_equal(
        vectors[1000:2000], np.random.default_rng(0).standard_normal((1000, 256)).astype(np.float32)
    )


# -- hostile and changed inputs ---------------------------------------------------------------------------
def folder_of(path: Path, names: list[str | bytes]) -> Path:
    """Images named ``names`` (bytes: a name that is not UTF-8, as Linux allows) in ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (path / os.fsdecode(name)).write_bytes(jpeg(i))
    return path


@pytest.mark.parametrize("fmt", ["files", "webdataset"])
def test_names_that_are_not_utf8_are_written_readably(model, tmp_path, fmt: str) -> None:
    latin1 = b"caf\xe9"  # "café" in Latin-1: a name an old camera or a Windows zip leaves behind
    if fmt == "files":
        inputs = [str(folder_of(tmp_path / "in", [latin1 + b".jpg", b"plain.jpg"]))]
    else:
        tar_path = tmp_path / "s.tar"
        with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:  # raw bytes
            add_member(tar, "caf\xe9.jpg", jpeg(0))
            add_member(tar, "plain.jpg", jpeg(1))
        inputs = [str(tar_path)]
    result = embed_dataset(model, inputs, fmt, tmp_path / "out")
    assert (result.embedded, result.failed) == (2, 0)
    _, metadata, _ = read_layout(tmp_path / "out")
    assert sorted(metadata["key"].to_pylist()) == ["caf\ufffd", "plain"]
    # Resuming reads the same names back and finds the shard holds them.
    assert embed_dataset(model, inputs, fmt, tmp_path / "out").shards_skipped == [0]


def test_a_failed_sample_lets_go_of_its_bytes_and_failures_do_not_wait_for_images(model) -> None:
    from clipworks.dataset import Sample, load_sample
    from clipworks.pipeline import iter_embeddings

    failed = load_sample(Sample(0, "k", "k", data=b"\xff\xd8\xff" + bytes(2**20)), enable_text=False)
    assert failed.error is not None and failed.data is None
    # Ten unreadable images, then one good one, in batches of 4: the failures go out four at a time
    # instead of all waiting for the one image.
    sources = [b"not an image %d" % i for i in range(10)] + [jpeg(0)]
    batches = list(
        iter_embeddings(model, sources, batch_size=4, workers=1, key=lambda s: s[:16], on_skip=lambda f: None)
    )
    assert [(len(b.failures), len(b.keys)) for b in batches] == [(4, 0), (4, 0), (2, 1)]


def test_a_resumed_job_with_other_columns_or_precision_is_refused(model, vit_bundle, tmp_path) -> None:
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(i))
        rows.append({"url": f"img/{i}.jpg", "caption": f"thing {i}", "alt": f"other {i}"})
    table = [str(write_table(tmp_path, "csv", rows))]
    embed_dataset(model, table, "csv", tmp_path / "out", enable_text=True, shard_size=2)
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*_00000.*")}
    with pytest.raises(UsageError, match=r"caption_column None, not 'alt'"):
        embed_dataset(model, table, "csv", tmp_path / "out", enable_text=True, shard_size=2, caption_column="alt")
    with pytest.raises(UsageError, match="precision 'fp32', not 'int8'"):
        embed_dataset(clipworks.load(vit_bundle, precision="int8"), table, "csv", tmp_path / "out",
                      enable_text=True, shard_size=2)  # fmt: skip
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize("change", ["file-added", "row-edited", "row-inserted-no-key-column", "files-removed"])
def test_a_resumed_job_whose_inputs_moved_samples_between_shards_is_refused(model, tmp_path, change: str) -> None:
    if change in ("file-added", "files-removed"):
        inputs, fmt = [str(folder_of(tmp_path / "in", [b"b.jpg", b"c.jpg", b"d.jpg", b"e.jpg"]))], "files"
    else:
        (tmp_path / "img").mkdir()
        for i in range(6):
            (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(i))
        rows = [{"url": f"img/{i}.jpg", "key": f"k{i}"} for i in range(4)]
        if change != "row-edited":  # keyed by their place in the table: 000000000, 000000001, ...
            rows = [{"url": row["url"]} for row in rows]
        inputs, fmt = [str(write_table(tmp_path, "csv", rows))], "csv"
    out = tmp_path / "out"
    embed_dataset(model, inputs, fmt, out, shard_size=2)
    if change == "files-removed":  # both shards finished; the second one's samples are gone from the folder
        (tmp_path / "in" / "d.jpg").unlink()
        (tmp_path / "in" / "e.jpg").unlink()
        refusal = r"finished shard 1 lies past the 1 shards the inputs now fill: the inputs changed"
    else:
        for kind in ("img_emb", "metadata", "errors"):  # shard 1 lost, as a crash would leave it
            for path in (out / kind).glob("*_00001.*"):
                path.unlink()
        if change == "file-added":
            (tmp_path / "in" / "a.jpg").write_bytes(jpeg(9))  # sorts first: every sample moves one place on
        elif change == "row-edited":
            write_table(tmp_path, "csv", [{"url": "img/5.jpg", "key": "k0"}, *rows[1:]])  # same key, other image
        else:
            write_table(tmp_path, "csv", [{"url": "img/5.jpg"}, *rows])  # the same keys, every image moved on
        refusal = r"finished shard 0 holds other samples than the inputs now put there \('[^']*/(a|[0-5])\.jpg' is"
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UsageError, match=refusal):
        embed_dataset(model, inputs, fmt, out, shard_size=2)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files  # nothing written or removed


def test_a_run_that_embeds_nothing_fails_and_retry_failed_redoes_only_shards_with_failures(
    capsys, vit_bundle, tmp_path
) -> None:
    (tmp_path / "img").mkdir()
    table = write_table(tmp_path, "csv", [{"url": str(tmp_path / "img" / f"{i}.jpg")} for i in range(4)])
    args = ["embed", "dataset", table, "--output-folder", tmp_path / "out", "--shard-size", 2, "-m", vit_bundle]
    code, err = run(capsys, *args)  # no image is there yet: an outage, a mount not up
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("error: none of the 4 samples read could be embedded (why: errors/)")
    assert "--retry-failed" in last
    out = tmp_path / "out"
    for i in range(4):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(i))
    code, err = run(capsys, *args)  # a plain resume keeps the finished shards as they are, and says so
    assert code == 0, err
    assert (
        "embedded 0 images into 0 shards, 2 finished shards skipped (4 of their samples had failed: "
        "--retry-failed embeds those again)" in err
    )
    (out / "metadata" / "metadata_00001.parquet").unlink()  # shard 1 lost in a crash: a plain resume redoes it
    code, err = run(capsys, *args)
    assert code == 0 and "embedded 2 images into 1 shards, 1 finished shards skipped" in err, err
    kept = (out / "metadata" / "metadata_00001.parquet").stat().st_mtime_ns
    code, err = run(capsys, *args, "--retry-failed")  # shard 0 still has its failures; shard 1 has none
    assert code == 0 and "embedded 2 images into 1 shards, 1 finished shards skipped" in err, err
    assert (out / "metadata" / "metadata_00001.parquet").stat().st_mtime_ns == kept
    _, metadata, _ = read_layout(out)
    assert len(metadata) == 4 and sum(pq.read_table(f).num_rows for f in (out / "errors").glob("*.parquet")) == 0


def test_csv_tables_with_a_byte_order_mark_or_in_latin1(capsys, model, vit_bundle, tmp_path) -> None:
    (tmp_path / "0.jpg").write_bytes(jpeg(0))
    (tmp_path / "bom.csv").write_bytes("\ufeffimage_path,caption\n0.jpg,a thing\n".encode())  # Excel's "CSV UTF-8"
    assert embed_dataset(model, [str(tmp_path / "bom.csv")], "csv", tmp_path / "out", enable_text=True).embedded == 1
    (tmp_path / "latin1.csv").write_bytes("image_path,caption\n0.jpg,caf\xe9\n".encode("latin-1"))
    code, err = run(capsys, "embed", "dataset", tmp_path / "latin1.csv", "--output-folder", tmp_path / "out2",
                    "-m", vit_bundle)  # fmt: skip
    last = err.strip().splitlines()[-1]
    assert code == 2 and err.count("error:") == 1 and last.startswith("error: "), err
    assert "latin1.csv is not UTF-8 text (invalid continuation byte in its first lines); save it as UTF-8" in last


def test_enable_text_on_a_table_without_captions_is_refused_before_any_work(capsys, vit_bundle, tmp_path) -> None:
    (tmp_path / "0.jpg").write_bytes(jpeg(0))
    table = write_table(tmp_path, "csv", [{"image_path": "0.jpg", "title": "not a caption column"}])
    code, err = run(capsys, "embed", "dataset", table, "--output-folder", tmp_path / "out", "--enable-text",
                    "-m", vit_bundle)  # fmt: skip
    last = err.strip().splitlines()[-1]
    assert code == 2 and err.count("error:") == 1 and last.startswith("error: "), err
    assert "has none of the caption columns caption, text, txt that --enable-text embeds" in last
    assert not (tmp_path / "out").exists()


def test_an_empty_caption_is_no_caption_in_every_format(model, tmp_path) -> None:
    write_shard(tmp_path / "s.tar", [("a", jpeg(0), b"cap"), ("b", jpeg(1), b"  \n")])
    folder = folder_of(tmp_path / "in", [b"a.jpg", b"b.jpg"])
    (folder / "a.txt").write_text("cap")
    (folder / "b.txt").write_text("")
    for inputs, fmt in (([str(tmp_path / "s.tar")], "webdataset"), ([str(folder)], "files")):
        result = embed_dataset(model, inputs, fmt, tmp_path / f"out-{fmt}", enable_text=True)
        assert (result.embedded, result.failed) == (1, 1)
        errors = pq.read_table(tmp_path / f"out-{fmt}" / "errors" / "errors_00000.parquet").to_pylist()
        assert errors[0]["key"] == "b" and "has no caption" in errors[0]["error"]


@pytest.mark.parametrize("fmt", ["webdataset", "files"])
def test_an_image_over_the_size_limit_is_an_error_row_unread(model, tmp_path, monkeypatch, fmt: str) -> None:
    import clipworks.dataset as dataset_module

    big = jpeg(0) + bytes(5000)  # a JPEG with trailing bytes: readable, but over the limit set below
    monkeypatch.setattr(dataset_module, "MAX_SAMPLE_BYTES", 4000)
    if fmt == "webdataset":
        write_shard(tmp_path / "s.tar", [("big", big, None), ("small", jpeg(1), None)])
        inputs = [str(tmp_path / "s.tar")]
    else:
        folder = folder_of(tmp_path / "in", [b"small.jpg"])
        (folder / "big.jpg").write_bytes(big)
        inputs = [str(folder)]
    result = embed_dataset(model, inputs, fmt, tmp_path / "out")
    assert (result.embedded, result.failed) == (1, 1)
    error = pq.read_table(tmp_path / "out" / "errors" / "errors_00000.parquet").to_pylist()[0]
    assert error["key"] == "big" and f"{len(big):,} bytes is over the 4,000-byte limit for one image" in error["error"]


def test_a_stream_that_returns_less_than_asked_is_read_to_its_end() -> None:
    """An HTTP body (fsspec without a known size) gives what has arrived; a pipe behaves the same way."""
    import threading

    from clipworks.dataset import _read_at_most

    image = jpeg(3)
    r, w = os.pipe()

    def trickle() -> None:
        for start in range(0, len(image), 100):
            os.write(w, image[start : start + 100])
        os.close(w)

    writer = threading.Thread(target=trickle)
    writer.start()
    with os.fdopen(r, "rb", buffering=0) as fh:
        assert _read_at_most(fh, 10 * len(image)) == image
    writer.join()
    assert _read_at_most(io.BytesIO(image), 10) == image[:10]
