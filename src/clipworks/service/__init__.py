"""The HTTP service: ``create_app`` (FastAPI) and its settings. Needs the ``serve`` extra."""

from __future__ import annotations

from clipworks.service.app import create_app
from clipworks.service.state import ServiceSettings

__all__ = ["ServiceSettings", "create_app"]
