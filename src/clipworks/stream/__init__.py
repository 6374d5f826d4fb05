"""Realtime streams: CLIP on live video, whole-frame or per tracked person, several streams at once.

The pieces compose as in supervision's video utilities: ``sources`` yields frames (threads, sync, loop,
dropped-frame counting), ``detect`` and ``track`` find people, ``schedule`` decides which tracks to classify,
``app`` runs the loop with per-stage timing, ``sinks`` write events, video and overlays, ``web`` serves
the live page with Hailo's prompt panel.
"""

from __future__ import annotations

from clipworks.stream.app import StreamApp, StreamOptions
from clipworks.stream.prompts import PromptState
from clipworks.stream.sources import Frame, Source, SourceError, open_sources

__all__ = ["Frame", "PromptState", "Source", "SourceError", "StreamApp", "StreamOptions", "open_sources"]
