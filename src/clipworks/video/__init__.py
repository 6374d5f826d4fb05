"""Video: frame sampling that matches ffmpeg's fps filter, per-frame features, zero-shot and search."""

from __future__ import annotations

from clipworks.video.features import FEATURE_KEY, VideoFeatures, extract_features, iter_feature_batches
from clipworks.video.frames import BadVideo, SampledFrame, Sampling, VideoInfo, iter_frames, plan_sampling, probe
from clipworks.video.search import Moment, top_moments

__all__ = [
    "FEATURE_KEY",
    "BadVideo",
    "Moment",
    "SampledFrame",
    "Sampling",
    "VideoFeatures",
    "VideoInfo",
    "extract_features",
    "iter_feature_batches",
    "iter_frames",
    "plan_sampling",
    "probe",
    "top_moments",
]
