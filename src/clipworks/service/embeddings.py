"""The encoder service: ``POST /v1/embeddings``, ``/v1/classify`` and ``/v1/rank``."""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from clipworks import ops
from clipworks.errors import UsageError
from clipworks.labelbank import LabelBank, Scoring, apply_template
from clipworks.service.limits import ImageTooLarge, InvalidImage, decode_base64
from clipworks.zeroshot import classify_embeddings

router = APIRouter(prefix="/v1", tags=["embeddings"])


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(default_factory=list, description="Texts to encode.")
    images: list[str] = Field(default_factory=list, description="Images as base64 or data URLs.")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="'float': lists of numbers; 'base64': little-endian float32 bytes."
    )


class EmbeddingOut(BaseModel):
    index: int
    type: Literal["text", "image"]
    embedding: list[float] | str


class EmbeddingsResponse(BaseModel):
    model: str
    dim: int
    encoding_format: str
    data: list[EmbeddingOut] = Field(description="Texts first, then images, in request order.")


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(default=None, description="One image (base64 or data URL).")
    images: list[str] = Field(default_factory=list, description="Or several.")
    labels: list[str] = Field(min_length=1)
    template: str | None = Field(default=None, description="Default 'a photo of a {}.'")
    top_k: int | None = Field(default=5, ge=1)


class LabelOut(BaseModel):
    label: str
    logit: float
    prob: float


class ClassifyResponse(BaseModel):
    model: str
    results: list[list[LabelOut]] = Field(description="Per image, the labels best first.")


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="The image (base64 or data URL).")
    texts: list[str] = Field(min_length=1, description="Candidate texts.")
    template: str = Field(default="{}", description="Applied to each text; '{}' keeps them as written.")


class RankOut(BaseModel):
    index: int
    text: str
    score: float
    prob: float


class RankResponse(BaseModel):
    model: str
    ranking: list[RankOut] = Field(description="Candidates by cosine to the image, best first.")


async def decode_images(request: Request, blobs: list[bytes | str]) -> list[np.ndarray]:
    """Base64 strings or raw bytes -> model pixels; 400 naming the bad one, 413 for an over-large one."""
    state = request.app.state.clip

    def work() -> list[np.ndarray]:
        out = []
        for i, blob in enumerate(blobs):
            try:
                out.append(state.decode(decode_base64(blob) if isinstance(blob, str) else blob))
            except ImageTooLarge as e:
                raise HTTPException(status_code=413, detail=f"images[{i}]: {e}") from e
            except InvalidImage as e:
                raise HTTPException(status_code=400, detail=f"images[{i}]: {e}") from e
        return out

    return await run_in_threadpool(work)


def _check_count(request: Request, n: int) -> None:
    limit = request.app.state.clip.settings.max_items
    if n > limit:
        raise HTTPException(status_code=413, detail=f"{n} texts and images in one request; the limit is {limit}")


def _template(template: str) -> str:
    try:
        apply_template(template, [])
    except UsageError as e:
        raise HTTPException(status_code=400, detail=str(e)) from e
    return template


async def _parse_embeddings_request(request: Request) -> tuple[list[str], list[bytes | str], str]:
    """JSON (images as base64) or multipart/form-data (``texts`` fields, ``images`` file uploads)."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        texts = [str(v) for v in form.getlist("texts")]
        images: list[bytes | str] = []
        for v in form.getlist("images"):
            images.append(await v.read() if hasattr(v, "read") else str(v))
        fmt = str(form.get("encoding_format") or "float")
        if fmt not in ("float", "base64"):
            raise HTTPException(status_code=422, detail=f"encoding_format must be 'float' or 'base64', not {fmt!r}")
        return texts, images, fmt
    try:
        body = EmbeddingsRequest.model_validate_json(await request.body())
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False)) from e
    return body.texts, list(body.images), body.encoding_format


_EMBEDDINGS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": EmbeddingsRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "texts": {"type": "array", "items": {"type": "string"}},
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                    },
                }
            },
        },
    }
}


@router.post(
    "/embeddings",
    response_model=EmbeddingsResponse,
    openapi_extra=_EMBEDDINGS_BODY,
    summary="Embed texts and/or images (JSON with base64 images, or multipart uploads)",
)
async def embeddings(request: Request) -> dict[str, Any]:
    texts, blobs, fmt = await _parse_embeddings_request(request)
    if not texts and not blobs:
        raise HTTPException(status_code=400, detail="give 'texts' and/or 'images'")
    _check_count(request, len(texts) + len(blobs))
    state = request.app.state.clip
    pixels = await decode_images(request, blobs) if blobs else []
    jobs = []
    if texts:
        jobs.append(state.embed_texts(texts))
    if pixels:
        jobs.append(state.embed_images(pixels))
    parts = await asyncio.gather(*jobs)
    emb = np.concatenate(parts) if len(parts) > 1 else parts[0]
    kinds = ["text"] * len(texts) + ["image"] * len(pixels)
    return {
        "model": state.holder.name,
        "dim": int(emb.shape[1]),
        "encoding_format": fmt,
        "data": [
            {"index": i, "type": k, "embedding": _encode(row, fmt)}
            for i, (k, row) in enumerate(zip(kinds, emb, strict=True))
        ],
    }


def _encode(row: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
    return row.tolist()


@router.post("/classify", response_model=ClassifyResponse, summary="Zero-shot classify images over labels")
async def classify(body: ClassifyRequest, request: Request) -> dict[str, Any]:
    state = request.app.state.clip
    blobs: list[bytes | str] = ([body.image] if body.image is not None else []) + list(body.images)
    if not blobs:
        raise HTTPException(status_code=400, detail="give 'image' or 'images'")
    if len(set(body.labels)) != len(body.labels) or any(not x.strip() for x in body.labels):
        raise HTTPException(status_code=400, detail="labels must be distinct and non-empty")
    _check_count(request, len(blobs) + len(body.labels))
    template = _template(body.template or state.settings.label_template)
    pixels = await decode_images(request, blobs)
    bank, image_emb = await asyncio.gather(state.label_bank(body.labels, template), state.embed_images(pixels))
    rows = classify_embeddings(bank, image_emb, body.top_k)
    return {"model": state.holder.name, "results": [[s.to_dict() for s in row] for row in rows]}


@router.post("/rank", response_model=RankResponse, summary="Rank candidate texts against one image")
async def rank(body: RankRequest, request: Request) -> dict[str, Any]:
    state = request.app.state.clip
    _check_count(request, 1 + len(body.texts))
    template = _template(body.template)
    pixels = await decode_images(request, [body.image])
    text_emb, image_emb = await asyncio.gather(
        state.embed_texts(apply_template(template, body.texts)), state.embed_images(pixels)
    )
    # Candidates may repeat, so they make a bank as they are rather than through label checks.
    bank = LabelBank.from_encoded(body.texts, text_emb, Scoring.of(state.model), [template])
    scores = bank.cosines(image_emb)[0]
    probs = bank.scoring.probabilities(scores[None])[0]
    order, _ = ops.top_k(scores, len(scores))
    ranking = [
        {"index": int(i), "text": body.texts[i], "score": float(scores[i]), "prob": float(probs[i])} for i in order
    ]
    return {"model": state.holder.name, "ranking": ranking}
