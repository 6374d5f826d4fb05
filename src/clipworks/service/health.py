"""``GET /healthz`` (readiness) and ``GET /metrics`` (Prometheus), and the middleware that feeds the metrics."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

router = APIRouter(tags=["health"])

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """One registry per app, so that several apps in one process (tests) keep separate counts."""

    def __init__(self, state: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "clipworks_requests", "HTTP requests by route and status.", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "clipworks_request_duration_seconds", "Request latency.", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "clipworks_batch_size", "Items per model run.", ["kind"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "clipworks_inference_seconds", "Model time per batch.", ["kind"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("clipworks_queue_depth", "Items waiting for the inference worker.", registry=r)
        self.queue_depth.set_function(lambda: state.batcher.depth)
        self.model_loaded = Gauge("clipworks_model_loaded", "1 once the model is loaded.", registry=r)
        self.model_loaded.set_function(lambda: float(state.holder.loaded))

    def observe_batch(self, kind: str, size: int, seconds: float) -> None:
        self.batch_size.labels(kind).observe(size)
        self.inference.labels(kind).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every response (401 and 413 included) and times it, labelled by route template."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unrouted"
            self.metrics.requests.labels(scope.get("method", ""), label, str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - t0)


@router.get(
    "/healthz",
    summary="Readiness: 200 once the model is loaded and the worker runs, else 503 with the reason; always open",
    responses={503: {"description": "Not ready: the model is not loaded yet, failed to load, or the worker stopped."}},
)
async def healthz(request: Request) -> JSONResponse:
    state = request.app.state.clip
    holder, batcher = state.holder, state.batcher
    reason = None
    if holder.error is not None:
        reason = holder.error
    elif not holder.loaded:
        reason = f"model {holder.name} is not loaded yet: it loads on the first request, or at start-up with preload"
    elif not batcher.alive:
        reason = "the inference worker is not running"
    body = {
        "status": "ok" if reason is None else "not ready",
        "model": holder.name,
        "loaded": holder.loaded,
        "worker": batcher.alive,
        "queue_depth": batcher.depth,
    }
    if reason is not None:
        body["reason"] = reason
    return JSONResponse(body, status_code=200 if reason is None else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.clip.metrics.render(), media_type=CONTENT_TYPE_LATEST)
