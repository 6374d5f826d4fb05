"""Person detectors behind one small protocol: OpenCV's HOG people detector (no weights) and YOLO ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from clipworks.errors import UsageError
from clipworks.ops import sigmoid

PERSON_CLASS = 0  # COCO


class Detector(Protocol):
    """``detect(rgb)`` returns ``(boxes, scores)``: (N, 4) float32 xyxy pixels and (N,) float32 in [0, 1]."""

    name: str

    def detect(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)


class HogPersonDetector:
    """OpenCV's built-in HOG + linear SVM people detector (Dalal-Triggs): no downloaded weights.

    SVM margins are squashed to (0, 1) with a logistic so that ``threshold`` reads like a confidence.
    HOG needs people at least 128 px tall; ``upscale`` > 1 finds smaller ones at a quadratic cost.
    """

    name = "hog"

    def __init__(self, threshold: float = 0.5, *, upscale: float = 1.0, win_stride: int = 8, scale: float = 1.1):
        import cv2

        self._cv2 = cv2
        self.threshold = threshold
        self.upscale = upscale
        self.win_stride = win_stride
        self.scale = scale
        self._hog = cv2.HOGDescriptor()
        self._hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())

    def detect(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cv2 = self._cv2
        image = rgb if self.upscale == 1.0 else cv2.resize(rgb, None, fx=self.upscale, fy=self.upscale)
        s = self.win_stride
        rects, weights = self._hog.detectMultiScale(image, winStride=(s, s), padding=(8, 8), scale=self.scale)
        if len(rects) == 0:
            return _empty()
        rects = np.asarray(rects, np.float32).reshape(-1, 4) / self.upscale
        scores = sigmoid(np.asarray(weights, np.float32).reshape(-1))
        boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
        keep = scores >= self.threshold
        boxes, scores = boxes[keep], scores[keep]
        return _nms(boxes, scores, 0.45)


class YoloOnnxDetector:
    """A YOLO-family ONNX detector (COCO classes): YOLOv5 ``(1, N, 85)`` or YOLOv8+ ``(1, 84, N)`` output.

    Input is letterboxed to the graph's square size (640 when dynamic); only class 0 (person) is kept.
    """

    name = "yolo"

    def __init__(self, path: str | Path, threshold: float = 0.5, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise UsageError(f"--detector {path}: no such ONNX file; pass a YOLO .onnx file or 'person'")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise UsageError(f"--detector {path}: not a loadable ONNX graph ({e})") from e
        inp = self._session.get_inputs()[0]
        self._input = inp.name
        side = inp.shape[-1]
        self.size = side if isinstance(side, int) else 640
        self.threshold = threshold

    def detect(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        h, w = rgb.shape[:2]
        r = self.size / max(h, w)
        nh, nw = round(h * r), round(w * r)
        canvas = np.full((self.size, self.size, 3), 114, np.uint8)
        top, left = (self.size - nh) // 2, (self.size - nw) // 2
        canvas[top : top + nh, left : left + nw] = cv2.resize(rgb, (nw, nh))
        x = canvas.transpose(2, 0, 1)[None].astype(np.float32) / 255.0
        out = np.asarray(self._session.run(None, {self._input: x})[0])[0]
        boxes, scores = parse_yolo(out)
        keep = scores >= self.threshold
        boxes, scores = boxes[keep], scores[keep]
        boxes = (boxes - np.array([left, top, left, top], np.float32)) / r
        boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
        return _nms(boxes, scores, 0.45)


def parse_yolo(out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Person boxes (xyxy, letterbox pixels) and scores from one image's raw YOLO output."""
    out = np.asarray(out, np.float32)
    if out.ndim != 2:
        raise UsageError(f"YOLO output has shape {out.shape}; expected (N, 85) or (84, N)")
    # v8 writes channels first (84, N); v5 writes rows (N, 85). Decide by the 84/85 axis, not by which
    # axis is longer: a graph with NMS folded in can report fewer than 84 candidates.
    if out.shape[0] == 84 or (out.shape[0] == 85 and out.shape[1] not in (84, 85)):
        out = out.T
    if out.shape[1] == 85:  # v5: cx, cy, w, h, objectness, 80 class scores
        scores = out[:, 4] * out[:, 5 + PERSON_CLASS]
        best = out[:, 5:].argmax(axis=1)
    elif out.shape[1] == 84:  # v8+: cx, cy, w, h, 80 class scores
        scores = out[:, 4 + PERSON_CLASS]
        best = out[:, 4:].argmax(axis=1)
    else:
        raise UsageError(f"YOLO output has {out.shape[1]} values per box; expected 84 (v8) or 85 (v5)")
    keep = best == PERSON_CLASS
    cx, cy, bw, bh = out[keep, 0], out[keep, 1], out[keep, 2], out[keep, 3]
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
    return boxes.astype(np.float32), scores[keep].astype(np.float32)


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> tuple[np.ndarray, np.ndarray]:
    if len(boxes) == 0:
        return _empty()
    order = scores.argsort()[::-1]
    keep: list[int] = []
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while len(order):
        i = order[0]
        keep.append(int(i))
        xx1 = np.maximum(boxes[i, 0], boxes[order[1:], 0])
        yy1 = np.maximum(boxes[i, 1], boxes[order[1:], 1])
        xx2 = np.minimum(boxes[i, 2], boxes[order[1:], 2])
        yy2 = np.minimum(boxes[i, 3], boxes[order[1:], 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        overlap = inter / (area[i] + area[order[1:]] - inter + 1e-9)
        order = order[1:][overlap <= iou]
    return boxes[keep].astype(np.float32), scores[keep].astype(np.float32)


def make_detector(spec: str, threshold: float = 0.5, *, threads: int | None = None) -> Detector | None:
    """``none`` -> None, ``person`` -> HOG, a path ending in .onnx -> YOLO."""
    if spec == "none":
        return None
    if spec == "person":
        return HogPersonDetector(threshold)
    if spec.endswith(".onnx"):
        return YoloOnnxDetector(spec, threshold, threads=threads)
    raise UsageError(f"--detector must be none, person or a YOLO .onnx path, not {spec!r}")
