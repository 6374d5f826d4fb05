"""Automatic1111's interrogate API (``/sdapi/v1/interrogate``) and a structured variant.

The contract follows stable-diffusion-webui's ``modules/api/api.py`` (``interrogateapi`` and
``decode_base64_to_image``): ``image`` null answers 404 "Image not found"; an image that does not
decode answers 500 "Invalid encoded image" (checked before the model, as there); a model other than
``clip`` answers 404 "Model not found"; a body that does not validate answers FastAPI's 422. Errors
on these routes carry Automatic1111's body ``{"error", "detail", "body", "errors"}`` (see ``app.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from clipworks.errors import UsageError
from clipworks.service.limits import ImageTooLarge, InvalidImage, check_pixels, decode_base64
from clipworks.zeroshot import CategorySet, apply_template, parse_categories

router = APIRouter(tags=["automatic1111"])


class InterrogateRequest(BaseModel):
    image: str | None = Field(default="", description="The image as base64, or a data URL (data:image/png;base64,...).")
    model: str = Field(default="clip", description="Only 'clip' is served.")


class TagScoreOut(BaseModel):
    tag: str
    score: float


class InterrogateResponse(BaseModel):
    caption: str = Field(description="The tags that pass the threshold, best first, joined by ', '.")
    interrogations: list[TagScoreOut] = Field(description="Those tags with their cosine to the image.")


class StructuredRequest(BaseModel):
    image: str | None = Field(default="", description="The image as base64 or a data URL.")
    categories: Any = Field(
        default=None,
        description='{"category": ["label", ...], ...}; each category is answered by softmax(100 * cos).',
        examples=[{"age group": ["child", "adult", "senior"], "clothing colour": ["red", "blue", "black"]}],
    )
    template: str | None = Field(
        default=None, description="Prompt template for the labels (default 'a photo of a {}.')"
    )


class CategoryOut(BaseModel):
    winner: str
    confidence: float
    probs: dict[str, float]


class StructuredResponse(BaseModel):
    results: dict[str, CategoryOut]
    general_tags: list[str]


async def read_image(request: Request, encoding: str, model: str = "clip") -> Any:
    """Decode as Automatic1111 does, then check the model, then preprocess: pixels for the worker."""
    state = request.app.state.clip

    def header() -> bytes:
        data = decode_base64(encoding)
        check_pixels(data, state.settings.max_pixels)
        return data

    try:
        data = await run_in_threadpool(header)
        if model != "clip":
            raise HTTPException(status_code=404, detail="Model not found")
        return await run_in_threadpool(state.decode, data)
    except ImageTooLarge as e:
        raise HTTPException(status_code=413, detail=f"Image too large: {e}") from e
    except InvalidImage as e:
        raise HTTPException(status_code=500, detail="Invalid encoded image") from e


@router.post("/sdapi/v1/interrogate", response_model=InterrogateResponse, summary="Caption an image (Automatic1111)")
async def interrogate(body: InterrogateRequest, request: Request) -> dict[str, Any]:
    if body.image is None:
        raise HTTPException(status_code=404, detail="Image not found")
    state = request.app.state.clip
    pixels = await read_image(request, body.image, body.model)
    emb = await state.embed_images([pixels])
    tags = await state.tag_index()
    s = state.settings
    return tags.interrogate(emb, s.threshold, s.top)[0].to_dict()


@router.post(
    "/sdapi/v1/interrogate/structured",
    response_model=StructuredResponse,
    summary="Constrained output: one winner per category",
)
async def interrogate_structured(body: StructuredRequest, request: Request) -> dict[str, Any]:
    if body.image is None:
        raise HTTPException(status_code=404, detail="Image not found")
    state = request.app.state.clip
    template = body.template or state.settings.label_template
    try:
        categories = parse_categories(body.categories, "categories")
        flat = [label for labels in categories.values() for label in labels]
        prompts = apply_template(template, flat)
    except UsageError as e:
        raise HTTPException(status_code=400, detail=str(e)) from e
    pixels = await read_image(request, body.image)
    text_emb, emb = await asyncio.gather(state.text_embeddings_cached(prompts), state.embed_images([pixels]))
    cats = CategorySet.build(None, categories, template=template, encode=lambda _: text_emb)
    tags = await state.tag_index()
    s = state.settings
    interrogation = tags.interrogate(emb, s.threshold, s.top)[0]
    results = cats.evaluate(emb)[0]
    return {
        "results": {name: r.to_dict(with_probs=True) for name, r in results.items()},
        "general_tags": [t.tag for t in interrogation.tags],
    }
