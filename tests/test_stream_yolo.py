"""The YOLO ONNX detector path: output parsing (v5 and v8 layouts), letterbox mapping, NMS, and a stream run.

The graphs are built here with onnx.helper and answer a fixed detection tensor, so the test knows exactly
which boxes a correct detector must report in the frame's own pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clipworks.cli.main import main
from clipworks.errors import UsageError
from clipworks.stream.detect import YoloOnnxDetector, make_detector, parse_yolo

FRAME_W, FRAME_H, SIDE = 768, 576, 640  # vtest.avi's frame, letterboxed into YOLO's 640 square
SCALE = SIDE / FRAME_W  # 0.8333: the frame fills the width, 80 px of padding above and below
TOP = (SIDE - round(FRAME_H * SCALE)) // 2

# (cx, cy, w, h) in letterbox pixels, class, score
CANDIDATES = [
    ((320.0, 320.0, 100.0, 200.0), 0, 0.90),  # a person: reported
    ((322.0, 321.0, 100.0, 198.0), 0, 0.80),  # the same person again: removed by NMS
    ((500.0, 200.0, 60.0, 120.0), 0, 0.30),  # a person under the threshold: dropped
    ((100.0, 300.0, 80.0, 50.0), 2, 0.95),  # a car: not a person
]


def _yolo_graph(path: Path, layout: str) -> Path:
    import onnx
    from onnx import TensorProto, helper

    n = len(CANDIDATES)
    rows = np.zeros((n, 85 if layout == "v5" else 84), np.float32)
    for i, ((cx, cy, w, h), cls, score) in enumerate(CANDIDATES):
        rows[i, :4] = (cx, cy, w, h)
        if layout == "v5":
            rows[i, 4] = 1.0  # objectness
            rows[i, 5 + cls] = score
        else:
            rows[i, 4 + cls] = score
    out = rows[None] if layout == "v5" else rows.T[None]  # v5 (1, N, 85); v8 (1, 84, N)
    # output = constant + 0 * mean(image): a real dependency on the input, as a detector has.
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["detections", "nothing"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fake-yolo",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(out.shape))],
        initializer=[
            onnx.numpy_helper.from_array(out, "detections"),
            onnx.numpy_helper.from_array(np.zeros((), np.float32), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("layout", ["v8", "v5"])
def test_detector_reports_people_in_frame_pixels(tmp_path: Path, layout: str) -> None:
    detector = make_detector(str(_yolo_graph(tmp_path / f"{layout}.onnx", layout)), threshold=0.5)
    assert isinstance(detector, YoloOnnxDetector) and detector.size == SIDE
    boxes, scores = detector.detect(np.zeros((FRAME_H, FRAME_W, 3), np.uint8))
    assert scores.tolist() == pytest.approx([0.90])  # the duplicate, the weak one and the car are gone
    cx, cy, w, h = CANDIDATES[0][0]
    expected = [(cx - w / 2) / SCALE, (cy - h / 2 - TOP) / SCALE, (cx + w / 2) / SCALE, (cy + h / 2 - TOP) / SCALE]
    np.testing.assert_allclose(boxes[0], expected, atol=1e-3)


@pytest.mark.parametrize(
    ("shape", "message"),
    [((84,), "expected \\(N, 85\\) or \\(84, N\\)"), ((10, 7), "7 values per box")],
)
def test_unexpected_output_shapes_are_refused(shape, message) -> None:
    with pytest.raises(UsageError, match=message):
        parse_yolo(np.zeros(shape, np.float32))


@pytest.mark.parametrize(
    ("spec", "message"),
    [("missing.onnx", "no such ONNX file"), ("garbage.onnx", "not a loadable ONNX graph"), ("cat", "must be none")],
)
def test_bad_detector_arguments(tmp_path: Path, monkeypatch, spec: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.onnx").write_bytes(b"not a graph")
    with pytest.raises(UsageError, match=message):
        make_detector(spec)


def test_stream_with_a_yolo_file_tracks_the_detected_person(vit_bundle, test_data, tmp_path, capsys) -> None:
    graph = _yolo_graph(tmp_path / "yolo.onnx", "v8")
    events = tmp_path / "events.jsonl"
    code = main(
        ["stream", "--input", str(test_data / "videos" / "vtest.avi"), "--model", str(vit_bundle),
         "--detector", str(graph), "--json-path", str(tmp_path / "prompts.json"), "--events", str(events),
         "--max-frames", "15"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    classified = [e for e in map(json.loads, events.read_text().splitlines()) if e["event"] == "classification"]
    assert classified, "the detected person was never classified"
    assert len({e["track_id"] for e in classified}) == 1  # one steady box: one track
    cx, cy, w, h = CANDIDATES[0][0]
    expected = [(cx - w / 2) / SCALE, (cy - h / 2 - TOP) / SCALE, (cx + w / 2) / SCALE, (cy + h / 2 - TOP) / SCALE]
    np.testing.assert_allclose(classified[0]["box"], expected, atol=2.0)
