"""clipworks stream: whole-frame, person and multi-stream modes headless, checked through the events file."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from clipworks.cli.main import main
from clipworks.prompts import PromptEntry, PromptSet
from clipworks.stream.schedule import ClassifySchedule


def _events(path: Path, kind: str = "classification") -> list[dict]:
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == kind]


@pytest.fixture(scope="module")
def vtest(test_data: Path) -> Path:
    return test_data / "videos" / "vtest.avi"


@pytest.fixture(scope="module")
def prompt_file(vit_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import clipworks
    from clipworks.prompts import encode_entries

    model = clipworks.load(vit_bundle)
    ps = PromptSet.from_texts(["a person walking", "a street"], ["an empty road"], threshold=0.0)
    encode_entries(ps, model.encode_texts)
    return ps.save(tmp_path_factory.mktemp("prompts") / "embeddings.json")


def _clip(src: Path, dest: Path, frames: int, dark: bool = False) -> Path:
    import av

    with av.open(str(src)) as inp, av.open(str(dest), "w") as out:
        s = out.add_stream("mpeg4", rate=10)
        for i, frame in enumerate(inp.decode(video=0)):
            if i == frames:
                break
            rgb = frame.to_ndarray(format="rgb24")
            if i == 0:
                s.width, s.height, s.pix_fmt = rgb.shape[1], rgb.shape[0], "yuv420p"
                s.options = {"qscale": "2"}
            for p in s.encode(av.VideoFrame.from_ndarray(rgb // 3 if dark else rgb, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return dest


def test_whole_frame_labels_every_processed_frame(vit_bundle, vtest, prompt_file, tmp_path, capsys):
    events = tmp_path / "ev.jsonl"
    out = tmp_path / "out.mp4"
    code = main(["stream", "--input", str(vtest), "--model", str(vit_bundle), "--json-path", str(prompt_file),
                 "--events", str(events), "--max-frames", "12", "--show-fps", "--output", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    ev = _events(events)
    assert [e["frame"] for e in ev] == list(range(12))
    assert all(e["track_id"] is None and e["box"] == [0.0, 0.0, 768.0, 576.0] for e in ev)
    assert {e["label"] for e in ev} <= {"a person walking", "a street", "an empty road"}
    assert all(0.0 <= e["probability"] <= 1.0 and isinstance(e["passed"], bool) for e in ev)
    # threshold 0: a best positive passes, a best negative never does
    assert all(e["passed"] == (e["label"] != "an empty road") for e in ev)
    assert "processed" in capsys.readouterr().err  # --show-fps line
    import av

    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 12


def test_disable_runtime_prompts_never_touches_the_text_encoder(vit_bundle, vtest, prompt_file, tmp_path):
    script = f"""
import sys
from clipworks.models.bundle import Bundle
opened = []
real = Bundle.graph
def graph(self, tower, *a, **k):
    opened.append(tower)
    return real(self, tower, *a, **k)
Bundle.graph = graph
from clipworks.cli.main import main
flag = sys.argv[1:]
code = main(["stream", "--input", {str(vtest)!r}, "--model", {str(vit_bundle)!r}, "--json-path",
             {str(prompt_file)!r}, "--max-frames", "3", *flag])
print("RESULT", code, "textual" in opened, "clipworks.tokenizer" in sys.modules, "tokenizers" in sys.modules)
"""

    def run(*flag: str) -> str:
        done = subprocess.run([sys.executable, "-c", script, *flag], capture_output=True, text=True, timeout=120)
        return next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))

    assert run("--disable-runtime-prompts") == "RESULT 0 False False False"
    assert run() == "RESULT 0 True True True"  # the same run with online prompts does load it


def test_disable_runtime_prompts_needs_the_file(vit_bundle, vtest, tmp_path, capsys):
    code = main(["stream", "--input", str(vtest), "--model", str(vit_bundle), "--json-path",
                 str(tmp_path / "none.json"), "--disable-runtime-prompts", "--max-frames", "1"])  # fmt: skip
    assert code == 2
    assert "cannot create it without the text encoder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.mp4", "no such file"),
        (lambda d: (d / "garbage.mp4").write_bytes(b"\x00garbage" * 100) and d / "garbage.mp4", "cannot be read"),
        (lambda d: "http://127.0.0.1:9/stream.mp4", "cannot be reached"),
    ],
)
def test_broken_input_ends_with_a_clear_message(make, message, vit_bundle, tmp_path, capsys):
    uri = str(make(tmp_path))
    code = main(["stream", "--input", uri, "--model", str(vit_bundle), "--max-frames", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: input ") and uri in err and message in err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def person_run(vit_bundle, vtest, prompt_file, tmp_path_factory):
    """One person-mode run of 50 frames (5 s) with the first sighting of every track recorded."""
    import clipworks
    from clipworks.stream.app import StreamApp, StreamOptions
    from clipworks.stream.prompts import PromptState
    from clipworks.stream.sinks import EventsSink
    from clipworks.stream.sources import open_sources

    path = tmp_path_factory.mktemp("person") / "ev.jsonl"
    model = clipworks.load(vit_bundle)
    app = StreamApp(model, PromptState.open(prompt_file, None), open_sources([str(vtest)]),
                    StreamOptions(detector="person", max_frames=50), events=EventsSink(path))  # fmt: skip
    first_seen: dict[int, float] = {}
    real_due = app.schedules[0].due

    def due(ids, now):
        for tid in ids:
            first_seen.setdefault(tid, now)
        return real_due(ids, now)

    app.schedules[0].due = due
    app.run()
    app.events.close()
    return _events(path), first_seen


def test_person_mode_tracks_are_classified_on_sight_then_at_most_once_a_second(person_run):
    ev, first_seen = person_run
    assert ev and first_seen, "no tracked person in 5 s of vtest.avi"
    assert all(isinstance(e["track_id"], int) and len(e["box"]) == 4 for e in ev)
    by_track: dict[int, list[float]] = defaultdict(list)
    for e in ev:
        by_track[e["track_id"]].append(e["time"])
    assert set(by_track) == set(first_seen)  # every track was classified ...
    for tid, times in by_track.items():
        assert times[0] == pytest.approx(first_seen[tid], abs=1e-3)  # ... on first sight
        assert all(b - a >= 1.0 - 1e-6 for a, b in itertools.pairwise(times))  # then <= once a second
    assert any(len(t) >= 2 for t in by_track.values())  # and again after a second
    per_frame: dict[int, int] = defaultdict(int)
    for e in ev:
        per_frame[e["frame"]] += 1
    assert max(per_frame.values()) <= 8


@pytest.mark.parametrize(
    ("ids", "now", "expected"),
    [
        ([1, 2, 3], 0.0, [3]),  # a new track; the others were just classified
        ([1, 2], 0.5, []),  # classified half a second ago
        ([1, 2, 3], 1.0, [3, 1, 2]),  # the new one first, then the due ones
    ],
)
def test_schedule_table(ids, now, expected):
    s = ClassifySchedule(interval=1.0, max_crops=8)
    for tid in s.due([1, 2], 0.0):
        s.record(tid, 0.0, "x", 0.5, True, {})
    assert s.due(ids, now) == expected


def test_schedule_caps_crops_per_frame():
    s = ClassifySchedule(max_crops=8)
    assert len(s.due(range(20), 0.0)) == 8


def test_multi_stream_features_the_stream_with_the_planted_match(vit_bundle, vtest, tmp_path, capsys):
    import clipworks
    from clipworks.stream.detect import HogPersonDetector

    normal = _clip(vtest, tmp_path / "normal.mp4", 22)
    # A darkened copy: the tiny random model separates its crops cleanly from the original's.
    inverted = _clip(vtest, tmp_path / "dark.mp4", 22, dark=True)
    model = clipworks.load(vit_bundle)
    hog = HogPersonDetector(0.5)

    def crops_embedding(path: Path) -> np.ndarray:
        import av

        crops = []
        with av.open(str(path)) as c:
            for i, frame in enumerate(c.decode(video=0)):
                if i % 3:
                    continue
                rgb = frame.to_ndarray(format="rgb24")
                for x1, y1, x2, y2 in hog.detect(rgb)[0].astype(int):
                    crops.append(rgb[max(0, y1) : y2, max(0, x1) : x2])
        assert crops
        return model.encode_images(crops).mean(axis=0)

    ps = PromptSet([PromptEntry("planted", crops_embedding(inverted)),
                    PromptEntry("other", crops_embedding(normal), negative=True)], threshold=0.0)  # fmt: skip
    prompts = ps.save(tmp_path / "planted.json")
    events = tmp_path / "ev.jsonl"
    code = main(["stream", "--multi-stream", "--input", str(normal), "--input", str(inverted), "--input",
                 str(tmp_path / "gone.mp4"), "--model", str(vit_bundle), "--json-path", str(prompts),
                 "--disable-runtime-prompts", "--events", str(events)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert "error: stream 2: input" in err and "gone.mp4" in err  # the broken input is reported ...
    ev = _events(events)
    assert {e["stream"] for e in ev} == {0, 1}  # ... and the others ran to the end
    featured = [e["stream"] for e in _events(events, "featured")]
    assert featured and all(s == 1 for s in featured), featured


def test_demo_clip_is_made_once_in_the_cache(tmp_path, monkeypatch) -> None:
    import av

    from clipworks.stream.sources import demo_video

    monkeypatch.setenv("CLIPWORKS_HOME", str(tmp_path))
    monkeypatch.delenv("CLIPWORKS_DEMO_VIDEO", raising=False)
    clip = demo_video()
    assert clip == tmp_path / "stream" / "demo.mp4"
    assert [p.name for p in clip.parent.iterdir()] == ["demo.mp4"]  # no temporary file left beside it
    with av.open(str(clip)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == 100
    stamp = clip.stat().st_mtime_ns
    assert demo_video() == clip and clip.stat().st_mtime_ns == stamp  # reused, not made again


@pytest.mark.parametrize(
    ("flag", "name", "message"),
    [
        ("--output", "no-such-folder/out.mp4", "does not exist"),
        ("--events", "no-such-folder/ev.jsonl", "does not exist"),
        ("--output", "a-folder.mp4", "is a folder"),
    ],
)
def test_unwritable_outputs_are_refused_before_the_first_frame(vtest, tmp_path, capsys, flag, name, message):
    (tmp_path / "a-folder.mp4").mkdir()
    # A model that does not exist proves the check comes before the model loads and any frame is read.
    code = main(["stream", "--input", str(vtest), "--model", str(tmp_path / "no-model"), flag, str(tmp_path / name)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and flag in err and message in err and "no-model" not in err


CHANGE = re.compile(r"^(\d+\.\d\d)s stream 0: (.+) \d\.\d{3}( \(below threshold\))?$")


def test_headless_stream_prints_each_change_and_creates_no_prompt_file(vit_bundle, vtest, tmp_path, capsys,
                                                                     monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    events = tmp_path / "ev.jsonl"
    code = main(["stream", "--input", str(vtest), "--model", str(vit_bundle), "--max-frames", "12",
                 "--events", str(events)])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev.jsonl"]  # no embeddings.json nobody asked for
    changes, last = [], None
    for e in _events(events):
        if (e["label"], e["passed"]) != last:
            last = (e["label"], e["passed"])
            changes.append((f"{e['time']:.2f}", e["label"], e["passed"]))
    printed = [CHANGE.match(line) for line in out.splitlines()]
    assert all(printed), out
    assert [(m[1], m[2], m[3] is None) for m in printed] == changes, out
    asked = tmp_path / "mine.json"
    code = main(["stream", "--input", str(vtest), "--model", str(vit_bundle), "--max-frames", "1",
                 "--json-path", str(asked)])  # fmt: skip
    assert code == 0 and PromptSet.load(asked).entries
