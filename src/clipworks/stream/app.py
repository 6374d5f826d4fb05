"""The processing loop: read frames, (detect, track, schedule,) CLIP, match, draw, write; timed per stage.

Whole-frame mode embeds every frame it gets (one batch per round of streams). Person mode runs the
detector and a tracker per stream and embeds only the crops of tracks that are due (new, or classified
more than ``interval`` seconds ago), at most ``max_crops`` a frame. Times are the frames' own clock
(media time for files, seconds since opening for live sources), so runs on files are reproducible.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from clipworks.prompts import match
from clipworks.stream.prompts import PromptState
from clipworks.stream.schedule import ClassifySchedule
from clipworks.stream.sinks import (
    GREEN,
    GREY,
    RED,
    EventsSink,
    StageTimer,
    VideoSink,
    compose_grid,
    draw_label,
    draw_lines,
)
from clipworks.stream.sources import Frame, Source


@dataclass
class StreamOptions:
    detector: str = "none"  # none, person, or a YOLO .onnx path
    detection_threshold: float = 0.5
    interval: float = 1.0  # seconds between classifications of one track
    max_crops: int = 8
    multi_stream: bool = False
    show_fps: bool = False
    max_frames: int | None = None  # stop after this many processed rounds
    duration: float | None = None  # stop after this many wall-clock seconds
    feature_interval: float = 1.0
    draw: bool = False
    keep_alive: bool = False  # the web page is up: wait for Ctrl-C (or --duration) when the inputs end


@dataclass
class StreamSummary:
    rounds: int = 0
    frames: int = 0
    classifications: int = 0
    seconds: float = 0.0
    dropped: dict[int, int] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    stage_ms: dict[str, float] = field(default_factory=dict)
    featured: int = 0

    @property
    def fps(self) -> float:
        return self.rounds / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        drops = sum(self.dropped.values())
        stages = ", ".join(f"{k} {v:.1f} ms" for k, v in self.stage_ms.items())
        return (f"{self.frames} frames processed in {self.seconds:.1f} s ({self.fps:.1f} rounds/s), "
                f"{self.classifications} classifications, {drops} dropped; {stages}")  # fmt: skip


class StreamApp:
    def __init__(
        self,
        model: Any,
        prompts: PromptState,
        sources: list[Source],
        options: StreamOptions,
        *,
        events: EventsSink | None = None,
        video: VideoSink | None = None,
        view: Any = None,
        log: IO[str] | None = None,
        changes: IO[str] | None = None,
    ) -> None:
        self.model = model
        self.prompts = prompts
        self.sources = sources
        self.opts = options
        self.events = events
        self.video = video
        self.view = view
        self.log = log or sys.stderr
        # Where each change of a stream's (or a track's) label is printed, one line each: the CLI passes
        # stdout, so a headless run shows what it sees without --events.
        self.changes = changes
        self._shown: dict[tuple[int, int | None], tuple[str | None, bool]] = {}
        self.timer = StageTimer()
        self.person = options.detector != "none"
        self.detector: Any = None
        self.trackers: dict[int, Any] = {}
        self.schedules = {s.stream: ClassifySchedule(options.interval, options.max_crops) for s in sources}
        self.featured = 0
        self._last_feature: float | None = None
        self._annotated: dict[int, np.ndarray] = {}
        self._reported: set[int] = set()
        self._stop = False
        self.summary = StreamSummary()
        # What the web page shows: per stream, the latest whole-frame result or per-track results.
        self.latest: dict[int, dict[str, Any]] = {}
        self.running = False
        self._classified_version = prompts.version

    def stop(self) -> None:
        self._stop = True

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> StreamSummary:
        if self.person:
            from clipworks.stream.detect import make_detector
            from clipworks.stream.track import PersonTracker

            self.detector = make_detector(self.opts.detector, self.opts.detection_threshold)
            for s in self.sources:
                self.trackers[s.stream] = PersonTracker(frame_rate=s.fps or 10.0)
        for s in self.sources:
            if s.ended and s.error:
                self._report_end(s)
            elif not s.ended:
                s.start()
        start = time.perf_counter()
        last_print = start
        self.running = True
        try:
            while not self._stop:
                # Edits posted by the web page run here, between frames: the loop alone uses the model.
                self.prompts.apply_pending()
                if self.opts.duration is not None and time.perf_counter() - start >= self.opts.duration:
                    break
                live = [s for s in self.sources if not s.ended]
                frames: list[Frame] = []
                for s in live:
                    f = s.read(timeout=0.02 if s.latest_only and len(live) > 1 else 0.5)
                    if f is not None:
                        frames.append(f)
                for s in self.sources:
                    if s.ended and s.stream not in self._reported:
                        self._report_end(s)
                if not any(not s.ended for s in self.sources) and not frames:
                    if not self.opts.keep_alive:
                        break
                    time.sleep(0.05)  # the page stays up with the last frame; edits still apply
                    continue
                if not frames:
                    continue
                self.process(frames)
                self.summary.rounds += 1
                self.summary.frames += len(frames)
                now = time.perf_counter()
                if self.opts.show_fps and now - last_print >= 1.0:
                    print(self.fps_line(), file=self.log, flush=True)
                    last_print = now
                if self.opts.max_frames is not None and self.summary.rounds >= self.opts.max_frames:
                    break
                if self.opts.duration is not None and now - start >= self.opts.duration:
                    break
        finally:
            self.running = False
            for s in self.sources:
                s.stop()
            self.summary.seconds = time.perf_counter() - start
            self.summary.dropped = {s.stream: s.dropped for s in self.sources}
            self.summary.stage_ms = self.timer.mean_ms()
            self.summary.featured = self.featured
        return self.summary

    def _report_end(self, s: Source) -> None:
        self._reported.add(s.stream)
        if s.error:
            self.summary.errors[s.stream] = s.error
            print(f"error: stream {s.stream}: {s.error}", file=self.log, flush=True)
        else:
            print(f"stream {s.stream} ({s.name}) ended after {s.decoded} frames", file=self.log, flush=True)
        self._emit({"event": "source_end", "stream": s.stream, "input": s.uri, "error": s.error,
                    "frames": s.decoded, "dropped": s.dropped})  # fmt: skip

    def fps_line(self) -> str:
        inputs = ", ".join(f"#{s.stream} {s.fps:.0f} fps in, {s.dropped} dropped" for s in self.sources)
        stages = " ".join(f"{k} {v:.1f}" for k, v in self.timer.stage_ms().items())
        return f"processed {self.timer.fps():.1f} fps | {inputs} | ms: {stages}"

    # -- one round ----------------------------------------------------------------------------------
    def process(self, frames: list[Frame]) -> None:
        self.timer.add("decode", sum(f.decode_ms for f in frames) / len(frames))
        ps = self.prompts.current
        version = self.prompts.version
        if version != self._classified_version:
            # An edited prompt set: classify every visible track again now, not at its next interval.
            self._classified_version = version
            for sched in self.schedules.values():
                for lab in sched.tracks.values():
                    lab.last_time = None
        active = bool(ps.active_indices())
        if self.person:
            items = self._person_crops(frames)
        else:
            items = [(f, None, (0.0, 0.0, float(f.rgb.shape[1]), float(f.rgb.shape[0])), f.rgb) for f in frames]
        t0 = time.perf_counter()
        results = []
        if active and items:
            pixels = np.stack([self.model.preprocess(crop) for _, _, _, crop in items])
            emb = self.model.embed_image_batch(pixels)
            results = match(emb, ps, self.model)
        self.timer.add("clip", (time.perf_counter() - t0) * 1000)
        for (f, tid, box, _), r in zip(items, results, strict=False):
            self._record(f, tid, box, r, version)
        self._update_featured(frames)
        self.timer.tick(len(frames))
        t0 = time.perf_counter()
        if self.opts.draw:
            self._draw(frames)
        self.timer.add("draw", (time.perf_counter() - t0) * 1000)

    def _person_crops(self, frames: list[Frame]) -> list[tuple[Frame, int | None, tuple[float, ...], np.ndarray]]:
        items: list[tuple[Frame, int | None, tuple[float, ...], np.ndarray]] = []
        det_ms = trk_ms = 0.0
        for f in frames:
            t0 = time.perf_counter()
            boxes, scores = self.detector.detect(f.rgb)
            t1 = time.perf_counter()
            tracks = self.trackers[f.stream].update(boxes, scores)
            t2 = time.perf_counter()
            det_ms += (t1 - t0) * 1000
            trk_ms += (t2 - t1) * 1000
            by_id = {t.id: t for t in tracks}
            state = self.latest.setdefault(f.stream, {})
            state["tracks"] = {t.id: [round(v, 1) for v in t.box] for t in tracks}
            state["time"] = f.time
            for tid in self.schedules[f.stream].due(by_id, f.time):
                box = by_id[tid].box
                h, w = f.rgb.shape[:2]
                x1, y1 = max(0, int(box[0])), max(0, int(box[1]))
                x2, y2 = min(w, round(box[2])), min(h, round(box[3]))
                if x2 - x1 < 4 or y2 - y1 < 4:
                    continue
                items.append((f, tid, box, f.rgb[y1:y2, x1:x2]))
        self.timer.add("detect", det_ms / len(frames))
        self.timer.add("track", trk_ms / len(frames))
        return items

    def _record(self, f: Frame, tid: int | None, box: tuple[float, ...], r: Any, version: int = 0) -> None:
        probs = {int(k): round(float(v), 4) for k, v in r.probabilities.items()}
        if tid is not None:
            self.schedules[f.stream].record(tid, f.time, r.text, r.probability, r.passed, probs)
        state = self.latest.setdefault(f.stream, {})
        if tid is None:
            state.update(label=r.text, probability=r.probability, passed=r.passed, probabilities=probs, time=f.time)
        # The newest classification of the stream (a whole frame or a track), as the web page shows it;
        # a new dict each time, so a reader in another thread never sees one half written.
        state["result"] = {"label": r.text, "probability": round(float(r.probability), 4), "passed": bool(r.passed),
                           "probabilities": probs, "frame": f.index, "time": round(f.time, 4), "track_id": tid,
                           "prompts_version": version}  # fmt: skip
        self.summary.classifications += 1
        self._print_change(f, tid, r)
        self._emit(
            {
                "event": "classification",
                "time": round(f.time, 4),
                "wall": round(time.time(), 3),
                "stream": f.stream,
                "frame": f.index,
                "track_id": tid,
                "box": [round(float(v), 1) for v in box],
                "label": r.text,
                "probability": round(float(r.probability), 4),
                "passed": bool(r.passed),
            }
        )

    def _print_change(self, f: Frame, tid: int | None, r: Any) -> None:
        shown = (r.text, bool(r.passed))
        if self.changes is None or self._shown.get((f.stream, tid)) == shown:
            return
        self._shown[(f.stream, tid)] = shown
        who = f"stream {f.stream}" + (f" track {tid}" if tid is not None else "")
        mark = "" if r.passed else " (below threshold)"
        print(f"{f.time:.2f}s {who}: {r.text} {r.probability:.3f}{mark}", file=self.changes, flush=True)

    def _update_featured(self, frames: list[Frame]) -> None:
        if not self.opts.multi_stream:
            return
        clock = max(f.time for f in frames)
        if self._last_feature is None:
            self._last_feature = clock
            return
        if clock - self._last_feature < self.opts.feature_interval:
            return
        # Each visible track carries its latest label: the stream whose best one passes highest is featured.
        scores: dict[int, float] = {}
        for stream, state in self.latest.items():
            sched = self.schedules[stream]
            recent = clock - self.opts.feature_interval
            labels = [lab for lab in sched.tracks.values() if lab.last_seen >= recent] if self.person else []
            for lab in labels:
                if lab.passed:
                    scores[stream] = max(scores.get(stream, 0.0), lab.probability)
            if not self.person and state.get("passed"):
                scores[stream] = max(scores.get(stream, 0.0), state["probability"])
        best = max(scores.items(), key=lambda kv: kv[1], default=None)
        self.featured = best[0] if best is not None else self.sources[0].stream
        self._emit({"event": "featured", "time": round(clock, 4), "stream": self.featured,
                    "best": round(best[1], 4) if best else None})  # fmt: skip
        self._last_feature = clock

    def _emit(self, event: dict[str, Any]) -> None:
        if self.events is not None:
            self.events.write(event)

    # -- drawing ------------------------------------------------------------------------------------
    def _draw(self, frames: list[Frame]) -> None:
        ps = self.prompts.current
        for f in frames:
            img = f.rgb.copy()
            state = self.latest.get(f.stream, {})
            if self.person:
                sched = self.schedules[f.stream]
                for tid, box in state.get("tracks", {}).items():
                    lab = sched.tracks.get(tid)
                    text = f"#{tid}"
                    colour = GREY
                    if lab is not None and lab.label is not None:
                        text += f" {lab.label} {lab.probability:.2f}"
                        colour = GREEN if lab.passed else RED
                    draw_label(img, box, text, colour)
            elif state.get("label") is not None:
                mark = "" if state.get("passed") else " (below threshold)"
                draw_lines(img, [f"{state['label']} {state['probability']:.2f}{mark}"], (8, img.shape[0] - 12))
            self._annotated[f.stream] = img
        if self.opts.multi_stream:
            out = compose_grid([self._annotated.get(s.stream) for s in self.sources], self.featured)
        else:
            out = self._annotated[frames[0].stream].copy()
        if self.opts.show_fps:
            stages = self.timer.stage_ms()
            draw_lines(out, [f"{self.timer.fps():.1f} fps", *(f"{k} {v:.1f} ms" for k, v in stages.items())])
        del ps
        if self.video is not None:
            self.video.write(out)
        if self.view is not None:
            self.view.publish(out)  # encoded to JPEG by the web side, at its own rate
