"""``clipworks video``: video_features' files, formats and run behaviour, zero-shot and search."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import clipworks
from clipworks.cli.main import main
from clipworks.video.features import VideoFeatures, iter_feature_batches
from clipworks.video.frames import plan_sampling, probe
from clipworks.video.outputs import output_dir
from clipworks.video.predict import kinetics_prompts
from clipworks.video.search import top_moments

GGSY = "v_GGSY1Qvo990.mp4"  # 320x240, 355 frames at 981/50 fps, 18.04 s
ZNV = "v_ZNVhz7ctTq0.mp4"  # 480x360, 420 frames at 30 fps, 14 s
STATS = re.compile(r"^max: (-?\d+\.\d{8}); mean: (-?\d+\.\d{8}); min: (-?\d+\.\d{8})$")


def run(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def videos(test_data: Path) -> Path:
    return test_data / "videos"


def saved(out: Path, model_dir: str, stem: str, ext: str = ".npy") -> dict[str, np.ndarray]:
    folder = out / "clip" / model_dir
    load = np.load if ext == ".npy" else (lambda p: pickle.loads(Path(p).read_bytes()))
    return {key: load(folder / f"{stem}_{key}{ext}") for key in ("clip", "fps", "timestamps_ms")}


def test_output_folder_is_video_features_layout() -> None:
    assert output_dir("./output", "ViT-B/32") == Path("output/clip/ViT-B_32")
    assert output_dir("out", "RN50x4") == Path("out/clip/RN50x4")


@pytest.mark.parametrize(("action", "ext"), [("save_numpy", ".npy"), ("save_pickle", ".pkl")])
def test_saved_files_names_shapes_fps_and_timestamps(capsys, vit_bundle, videos, tmp_path, action, ext) -> None:
    out = tmp_path / "output"
    code, _, err = run(capsys, "video", "features", videos / GGSY, videos / ZNV, "--model", vit_bundle,
                       "--extraction-fps", 2, "--batch-size", 8, "--on-extraction", action,
                       "--output-path", out)  # fmt: skip
    assert code == 0, err
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    stems = ("v_GGSY1Qvo990", "v_ZNVhz7ctTq0")
    assert files == sorted(
        f"clip/{vit_bundle.name}/{s}_{k}{ext}" for s in stems for k in ("clip", "fps", "timestamps_ms")
    )
    for stem, frames in zip(stems, (36, 28), strict=True):
        data = saved(out, vit_bundle.name, stem, ext)
        assert data["clip"].shape == (len(data["timestamps_ms"]), 32) == (frames, 32)
        assert data["clip"].dtype == np.float64  # video_features builds them with np.array(list of floats)
        assert data["fps"].shape == () and float(data["fps"]) == 2.0
        np.testing.assert_array_equal(data["timestamps_ms"], np.arange(frames) / 2 * 1000)
    assert "frames/s" in err and "2 videos extracted" in err


def test_every_frame_features_are_raw_embeddings_of_ffmpegs_frames(vit_bundle, videos) -> None:
    """The features are the unnormalised embeddings of the right frames, in order (checked against ffmpeg)."""
    model = clipworks.load(vit_bundle)
    video = videos / GGSY
    stamps, chunks = [], []
    for t, e in iter_feature_batches(model, video, plan_sampling(probe(video), 0.5), batch_size=3):
        stamps.append(t)
        chunks.append(e)
    features = np.concatenate(chunks)
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(video), "-vf", "fps=0.5", "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout  # fmt: skip
    frames = list(np.frombuffer(raw, np.uint8).reshape(-1, 240, 320, 3))
    assert len(features) == len(frames) == 9
    expected = model.encode_images(frames, normalize=False)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.linalg.norm(features, axis=1), 1.0)  # raw, as video_features saves
    np.testing.assert_array_equal(np.concatenate(stamps), np.arange(9) / 0.5 * 1000)


def test_every_frame_saves_the_videos_own_fps_and_presentation_times(capsys, vit_bundle, videos, tmp_path) -> None:
    code, _, err = run(capsys, "video", "features", "--video-paths", videos / GGSY, "--model", vit_bundle,
                       "--batch-size", 32, "--on-extraction", "save_numpy", "--output-path", tmp_path)  # fmt: skip
    assert code == 0, err
    data = saved(tmp_path, vit_bundle.name, "v_GGSY1Qvo990")
    assert float(data["fps"]) == pytest.approx(19.62)
    assert data["clip"].shape == (355, 32)
    np.testing.assert_allclose(data["timestamps_ms"], np.arange(355) * 50 / 981 * 1000)


@pytest.mark.parametrize("layout", ["clipworks", "immich"])
def test_features_of_a_normalising_bundle_say_they_are_unit_vectors(
    capsys, vit_bundle, videos, tmp_path, layout
) -> None:
    bundle = vit_bundle
    if layout == "immich":  # Immich's layout: no clipworks.json, and graphs that normalise inside
        bundle = tmp_path / "immich"
        shutil.copytree(vit_bundle, bundle, ignore=shutil.ignore_patterns("clipworks.json", "int8", "fp16"))
    code, _, err = run(capsys, "video", "features", "--video-paths", videos / GGSY, "--model", bundle,
                       "--extraction-fps", 1, "--on-extraction", "save_numpy", "--output-path", tmp_path)  # fmt: skip
    assert code == 0, err
    warned = "features are unit vectors where video_features saves raw encode_image output" in err
    assert warned == (layout == "immich")
    folder = tmp_path / "clip" / bundle.name
    note = folder / "v_GGSY1Qvo990_clip.json"
    assert note.is_file() == (layout == "immich")  # the saved outputs say so too, beside the files
    clip = np.load(folder / "v_GGSY1Qvo990_clip.npy")
    assert clip.dtype == np.float64 and clip.shape == (18, 32)  # the .npy itself as video_features writes it
    if layout == "immich":
        assert json.loads(note.read_text())["unit_vectors"] is True


def _features(unit_vectors: bool) -> VideoFeatures:
    emb = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    if unit_vectors:
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return VideoFeatures(Path("clip.mp4"), emb, np.array([0.0, 500.0, 1000.0]), 2.0, unit_vectors=unit_vectors)


@pytest.mark.parametrize("action", ["save_numpy", "save_pickle", "save_parquet"])
@pytest.mark.parametrize("unit_vectors", [True, False])
def test_saved_features_record_whether_rows_are_unit_vectors(tmp_path, action, unit_vectors) -> None:
    from clipworks.video.outputs import feature_files, load_features, save_features, unit_vectors_file

    written = save_features(_features(unit_vectors), tmp_path, action)
    note = unit_vectors_file(tmp_path, "clip.mp4")
    files = feature_files(tmp_path, "clip.mp4", action)
    # The video_features files are the same whatever the model; only npy/pkl get a note, and only for unit rows.
    assert written == files + ([note] if unit_vectors and action != "save_parquet" else [])
    back = load_features(tmp_path, "clip.mp4")
    assert back is not None and back.unit_vectors is unit_vectors
    np.testing.assert_array_equal(back.embeddings, _features(unit_vectors).embeddings)
    if action == "save_parquet":
        import pyarrow.parquet as pq

        assert pq.read_schema(files[0]).metadata[b"unit_vectors"] == (b"true" if unit_vectors else b"false")


def test_raw_features_saved_over_unit_ones_drop_the_old_note(tmp_path) -> None:
    from clipworks.video.outputs import load_features, save_features, unit_vectors_file

    save_features(_features(True), tmp_path, "save_numpy")
    assert unit_vectors_file(tmp_path, "clip.mp4").is_file()
    save_features(_features(False), tmp_path, "save_numpy")  # the same video again, with a raw-output bundle
    assert not unit_vectors_file(tmp_path, "clip.mp4").exists()
    back = load_features(tmp_path, "clip.mp4")
    assert back is not None and not back.unit_vectors


def test_print_format_matches_video_features(capsys, vit_bundle, videos, tmp_path) -> None:
    args = ("video", "features", videos / GGSY, "--model", vit_bundle, "--extraction-fps", 1, "--batch-size", 4)
    code, out, err = run(capsys, *args)
    assert code == 0, err
    code, _, err = run(capsys, *args, "--on-extraction", "save_numpy", "--output-path", tmp_path)
    assert code == 0, err
    data = saved(tmp_path, vit_bundle.name, "v_GGSY1Qvo990")
    blocks = out.split("\n\n")
    for key, block in zip(("clip", "fps", "timestamps_ms"), blocks, strict=False):
        lines = block.strip("\n").splitlines()
        assert lines[0] == key
        value = data[key]
        assert lines[-1] == f"max: {value.max():.8f}; mean: {value.mean():.8f}; min: {value.min():.8f}"
        assert STATS.match(lines[-1])
        assert "\n".join(lines[1:-1]) == str(value)  # numpy's own printing, as `print(value)`
    assert out.endswith("\n\n")


def test_show_pred_with_pred_texts(capsys, vit_bundle, videos) -> None:
    texts = ["a dog smiles", "a woman is lifting"]
    code, out, err = run(capsys, "video", "features", videos / GGSY, "--model", vit_bundle, "--extraction-fps", 1,
                         "--batch-size", 5, "--show-pred", "--pred-texts", *texts)  # fmt: skip
    assert code == 0, err
    blocks = re.findall(r"  Logits \| Prob\. \| Label \n((?:.+\n)+)\n", out)
    assert len(blocks) == 18  # one per frame
    # Recompute frame 0 independently: logit_scale * cos, then softmax over the prompts.
    model = clipworks.load(vit_bundle)
    video = videos / GGSY
    _, first = next(iter_feature_batches(model, video, plan_sampling(probe(video), 1), batch_size=1))
    text = model.encode_texts(texts)
    logits = model.logit_scale * (first[0] / np.linalg.norm(first[0])) @ text.T
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    order = np.argsort(-probs)
    expected = "".join(f"{logits[i]:8.3f} | {probs[i]:.3f} | {texts[i]}\n" for i in order)
    assert blocks[0] == expected
    assert out.index("  Logits") < out.index("clip\n")  # predictions come while extracting, then the print


def test_over_long_pred_texts_are_named_in_a_warning(capsys, vit_bundle, videos) -> None:
    """video_features' clip.tokenize raises on prompts over 77 tokens; we encode them cut, and say which."""
    long_text = "a person " + "dancing and " * 40 + "singing"
    code, out, err = run(capsys, "video", "features", videos / GGSY, "--model", vit_bundle, "--extraction-total", 1,
                         "--show-pred", "--pred-texts", "a dog smiles", long_text)  # fmt: skip
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: --pred-texts {long_text!r} is longer than the model's 77 tokens; "
                        "it is cut to fit (video_features refuses it)"]  # fmt: skip
    assert "  Logits" in out  # and the predictions still come


def test_show_pred_defaults_to_kinetics_top5(capsys, vit_bundle, videos) -> None:
    code, out, err = run(capsys, "video", "features", videos / ZNV, "--model", vit_bundle, "--extraction-total", 2,
                         "--show-pred", "--on-extraction", "print")  # fmt: skip
    assert code == 0, err
    prompts = kinetics_prompts()
    assert len(prompts) == 400 and prompts[0] == "a photo of abseiling"
    blocks = re.findall(r"  Logits \| Prob\. \| Label \n((?:.+\n)+)\n", out)
    assert len(blocks) == 2
    for block in blocks:
        rows = block.splitlines()
        assert len(rows) == 5
        for row in rows:
            m = re.fullmatch(r"([ -]\d{3}\.\d{3}|\s*-?\d+\.\d{3}) \| (\d\.\d{3}) \| (a photo of .+)", row)
            assert m and m.group(3) in prompts and len(m.group(1)) >= 8


def test_kinetics_list_is_the_shared_one(test_data) -> None:
    shared = [line.strip() for line in (test_data / "labels" / "kinetics400.txt").read_text().splitlines()]
    assert kinetics_prompts() == [f"a photo of {x}" for x in shared if x]


def test_existing_outputs_are_skipped(capsys, vit_bundle, videos, tmp_path) -> None:
    args = ("video", "features", videos / GGSY, "--model", vit_bundle, "--extraction-total", 3,
            "--on-extraction", "save_pickle", "--output-path", tmp_path)  # fmt: skip
    assert run(capsys, *args)[0] == 0
    folder = tmp_path / "clip" / vit_bundle.name
    mtimes = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert f"Features for {videos / GGSY} already exist in {folder.absolute()}/ - skipping.." in out
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    (folder / "v_GGSY1Qvo990_fps.pkl").unlink()  # one output missing: extracted again
    code, out, _ = run(capsys, *args)
    assert code == 0 and "skipping" not in out and (folder / "v_GGSY1Qvo990_fps.pkl").is_file()


def test_a_failing_video_does_not_stop_the_run(capsys, vit_bundle, videos, tmp_path) -> None:
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"not a video at all")
    audio = tmp_path / "sound.m4a"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=duration=0.2", str(audio)], check=True)
    listing = tmp_path / "videos.txt"
    listing.write_text(f"{tmp_path / 'missing.mp4'}\n\n{corrupt}\n{audio}\n\n{videos / GGSY}\n")
    out = tmp_path / "out"
    code, _, err = run(capsys, "video", "features", "--file-with-video-paths", listing, "--model", vit_bundle,
                       "--extraction-total", 2, "--on-extraction", "save_numpy", "--output-path", out)  # fmt: skip
    assert code == 1
    for name, reason in (("missing.mp4", "does not exist"), ("corrupt.mp4", "cannot be read"),
                         ("sound.m4a", "no video stream")):  # fmt: skip
        assert re.search(rf"error: .*{name}.*{reason}", err), err
    assert "3 of 4 videos failed" in err
    assert saved(out, vit_bundle.name, "v_GGSY1Qvo990")["clip"].shape == (2, 32)


def test_duplicate_stems_are_refused_before_any_work(capsys, videos, tmp_path) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(videos / GGSY, other / GGSY)
    # A model that does not exist proves nothing was loaded or extracted first.
    code, _, err = run(capsys, "video", "features", videos / GGSY, videos / ZNV, other / GGSY,
                       "--model", tmp_path / "no-such-model", "--output-path", tmp_path / "out")  # fmt: skip
    assert code == 2
    assert "share a file name" in err and str(other / GGSY) in err and "no-such-model" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--extraction-fps", "1", "--extraction-total", "5"], "mutually exclusive"),
        (["--on-extraction", "save_csv"], "--on-extraction must be one of"),
        (["--format", "parquet", "--on-extraction", "save_numpy"], "cannot go with --on-extraction"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_bad_options_are_refused(capsys, videos, tmp_path, extra, message) -> None:
    code, _, err = run(capsys, "video", "features", videos / GGSY, "--model", tmp_path / "x", *extra)
    assert code == 2 and message in err


def test_custom_model_without_its_checkpoint_is_a_clear_error(capsys, videos, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "video", "features", videos / GGSY, "--model", "custom")
    assert code == 1
    assert "models/clip/checkpoints/CLIP-custom.pth" in err and "does not exist" in err


def test_custom_checkpoint_architecture_is_read_from_its_shapes() -> None:
    from clipworks.errors import ModelNotFound
    from clipworks.video.models import openai_arch

    vit = {"visual.proj": np.zeros(1), "visual.conv1.weight": np.zeros((768, 3, 16, 16)),
           "visual.positional_embedding": np.zeros((197, 768))}  # fmt: skip
    assert openai_arch(vit) == "ViT-B-16"
    blocks = zip((1, 2, 3, 4), (4, 6, 10, 6), strict=True)
    rn = {f"visual.layer{b}.{i}.conv1.weight": 0 for b, n in blocks for i in range(n)}
    assert openai_arch(rn) == "RN50x4"
    with pytest.raises(ModelNotFound, match="never released"):
        openai_arch({**vit, "visual.conv1.weight": np.zeros((512, 3, 8, 8))})


def test_parquet_has_one_row_per_frame(capsys, vit_bundle, videos, tmp_path) -> None:
    import pyarrow.parquet as pq

    code, _, err = run(capsys, "video", "features", videos / ZNV, "--model", vit_bundle, "--extraction-fps", 1,
                       "--format", "parquet", "--output-path", tmp_path, "--batch-size", 7)  # fmt: skip
    assert code == 0, err
    table = pq.read_table(tmp_path / "clip" / vit_bundle.name / "v_ZNVhz7ctTq0.parquet")
    assert table.column_names == ["video", "timestamp_ms", "embedding"]
    assert table.num_rows == 14
    assert table["video"].to_pylist() == [str(videos / ZNV)] * 14
    assert table["timestamp_ms"].to_pylist() == [i * 1000.0 for i in range(14)]
    assert np.asarray(table["embedding"].to_pylist()).shape == (14, 32)
    assert table.schema.metadata[b"fps"] == b"1.0"


def test_search_reuses_saved_features(capsys, vit_bundle, videos, tmp_path) -> None:
    out = tmp_path / "output"
    run(capsys, "video", "features", videos / GGSY, "--model", vit_bundle, "--extraction-fps", 2,
        "--on-extraction", "save_numpy", "--output-path", out)  # fmt: skip
    code, stdout, err = run(capsys, "video", "search", "a person riding a bike", videos / GGSY, videos / ZNV,
                            "--model", vit_bundle, "--output-path", out, "--top-k", 4)  # fmt: skip
    assert code == 0, err
    assert "using the 36 saved frames" in err  # GGSY from its files; ZNV embedded on the fly at 1 fps
    assert "v_ZNVhz7ctTq0.mp4: 14 frames at 1 fps" in err
    rows = [re.fullmatch(r"(-?\d\.\d{4})  (\d+:\d\d:\d\d\.\d{3})  (.+)", line) for line in stdout.splitlines()]
    assert len(rows) == 4 and all(rows)
    scores = [float(m.group(1)) for m in rows if m]
    assert scores == sorted(scores, reverse=True)


def test_top_moments_ranks_and_spreads_results() -> None:
    emb = np.eye(4, dtype=np.float32)[[0, 0, 1, 2, 0]] + 0.01
    a = VideoFeatures(Path("a.mp4"), emb, np.array([0.0, 500.0, 1000.0, 2000.0, 3000.0]), 2.0)
    b = VideoFeatures(Path("b.mp4"), np.eye(4, dtype=np.float32)[[3, 0]], np.array([0.0, 1000.0]), 1.0)
    moments = top_moments(np.array([1, 0, 0, 0.0]), [a, b], top_k=3, min_gap_ms=1000)
    # b@1000 is exactly the query; a@0 and a@3000 tie next; a@500 is within 1 s of a@0, so it is left out.
    assert [(m.video, m.timestamp_ms) for m in moments] == [("b.mp4", 1000.0), ("a.mp4", 0.0), ("a.mp4", 3000.0)]
    assert moments[0].score == pytest.approx(1.0) and moments[2].clock == "0:00:03.000"


def test_stopping_early_ends_the_decoder_thread(vit_bundle, videos) -> None:
    import threading

    model = clipworks.load(vit_bundle)
    batches = iter_feature_batches(model, videos / "vtest.avi", None, batch_size=2, queue_size=2)
    next(batches)
    batches.close()  # a consumer that stops must not leave a decoder holding frames
    assert not any(t.name == "clipworks-video" and t.is_alive() for t in threading.enumerate())


def test_reencode_on_request_keeps_tmp_files(capsys, vit_bundle, videos, tmp_path) -> None:
    code, _, err = run(capsys, "video", "features", videos / GGSY, "--model", vit_bundle, "--extraction-fps", 1,
                       "--reencode", "--keep-tmp-files", "--tmp-path", tmp_path / "tmp", "--output-path",
                       tmp_path / "out", "--on-extraction", "save_numpy", "--batch-size", 9)  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "tmp" / "clip" / vit_bundle.name / "v_GGSY1Qvo990_new_fps.mp4").is_file()
    data = saved(tmp_path / "out", vit_bundle.name, "v_GGSY1Qvo990")
    assert data["clip"].shape == (18, 32) and float(data["fps"]) == 1.0
    np.testing.assert_array_equal(data["timestamps_ms"], np.arange(18) * 1000.0)


def _cut_clip(tmp_path: Path) -> tuple[Path, Path]:
    """An 18-frame mp4 (index up front, as `-movflags faststart` writes it), and a copy with its last 40% cut off."""
    import av

    whole = tmp_path / "whole.mp4"
    with av.open(str(whole), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("mpeg4", rate=6)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(18):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = whole.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])
    return whole, cut


SHORT = re.compile(r"^warning: .*cut\.mp4: read (\d+) of the (\d+) frames its header promises", re.MULTILINE)


@pytest.mark.parametrize(("sampling", "expected"), [([], 18), (["--extraction-fps", "2"], 6)])
def test_a_truncated_video_warns_with_expected_and_read_frames(capsys, vit_bundle, tmp_path, sampling, expected):
    whole, cut = _cut_clip(tmp_path)
    out = tmp_path / "out"
    code, _, err = run(capsys, "video", "features", whole, "-m", vit_bundle, *sampling)
    assert code == 0 and "warning" not in err, err  # the whole file reads every frame its header promises
    code, _, err = run(capsys, "video", "features", cut, "-m", vit_bundle, *sampling,
                       "--on-extraction", "save_numpy", "--output-path", out)  # fmt: skip
    # The frames that were read are right and saved, so the run succeeds; the warning says what is missing.
    assert code == 0, err
    found = SHORT.search(err)
    assert found is not None, err
    read = int(found.group(1))
    assert int(found.group(2)) == expected and 0 < read < expected
    assert saved(out, vit_bundle.name, "cut")["clip"].shape == (read, 32)
    assert "1 cut short" in err
    code, _, err = run(capsys, "video", "search", "a dog", cut, "-m", vit_bundle, "--output-path", tmp_path / "none",
                       *(sampling or ["--extraction-fps", "6"]))  # fmt: skip
    assert code == 0 and SHORT.search(err), err


@pytest.mark.parametrize("command", [["features", "--extraction-total", "2"], ["search", "a dog"]])
def test_video_commands_honour_clipworks_model(capsys, vit_bundle, videos, tmp_path, monkeypatch, command) -> None:
    monkeypatch.setenv("CLIPWORKS_MODEL", str(vit_bundle))
    code, _, err = run(capsys, "video", *command, videos / GGSY, "--output-path", tmp_path)
    assert code == 0, err
