"""Automatic1111's interrogate API (``/sdapi/v1/interrogate``) and a structured variant.

The contract follows stable-diffusion-webui's ``modules/api/api.py`` (``interrogateapi`` and
``decode_base64_to_image``) and ``modules/api/models.py``: ``image`` is a plain string there, so ``null``
answers FastAPI's 422 like any body that does not validate; an image that does not decode answers 500
"Invalid encoded image", decoded in full before the model is looked at, as there; ``model`` ``clip`` and
``deepdanbooru`` are served (both by clipworks' tag interrogation: many clients send ``deepdanbooru``),
any other answers 404 "Model not found". An ``http(s)://`` image is fetched only from the hosts
``image_url_hosts`` lists, else 500 "Requests not allowed" (Automatic1111's answer with its
``api_enable_requests`` option off; it fetches any URL when the option is on, its default). Errors on these
routes carry Automatic1111's body ``{"error", "detail", "body", "errors"}`` (see ``app.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from clipworks.errors import UsageError
from clipworks.service.limits import (
    ImageTooLarge,
    ImageURLRefused,
    InvalidImage,
    check_pixels,
    decode_base64,
    fetch_image_url,
)
from clipworks.zeroshot import CategorySet, apply_template, category_labels, parse_categories

router = APIRouter(tags=["automatic1111"])

# Automatic1111 answers "clip" with its CLIP interrogator and "deepdanbooru" with its anime tagger; clipworks
# answers both with its zero-shot tags, since clients send either.
INTERROGATE_MODELS = frozenset({"clip", "deepdanbooru"})


class InterrogateRequest(BaseModel):
    image: str = Field(
        default="", description="The image as base64, a data URL (data:image/png;base64,...) or an allowed http(s) URL."
    )
    model: str = Field(default="clip", description="'clip' or 'deepdanbooru' (both answered with zero-shot tags).")


class TagScoreOut(BaseModel):
    tag: str
    score: float


class InterrogateResponse(BaseModel):
    caption: str = Field(description="The tags that pass the threshold, best first, joined by ', '.")
    interrogations: list[TagScoreOut] = Field(description="Those tags with their cosine to the image.")


class StructuredRequest(BaseModel):
    image: str = Field(default="", description="The image as base64, a data URL or an allowed http(s) URL.")
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
    """Decode as Automatic1111 does (in full, so a truncated file fails here), then check the model."""
    state = request.app.state.clip
    settings = state.settings
    is_url = encoding.startswith(("http://", "https://"))

    def load() -> Any:
        if is_url:
            data = fetch_image_url(encoding, settings.image_url_hosts, settings.max_body_bytes)
        else:
            data = decode_base64(encoding)
        check_pixels(data, settings.max_pixels)
        return state.decode(data)

    try:
        pixels = await run_in_threadpool(load)
    except ImageTooLarge as e:
        raise HTTPException(status_code=413, detail=f"Image too large: {e}") from e
    except ImageURLRefused as e:
        raise HTTPException(status_code=500, detail="Requests not allowed") from e
    except InvalidImage as e:
        raise HTTPException(status_code=500, detail="Invalid image url" if is_url else "Invalid encoded image") from e
    if model not in INTERROGATE_MODELS:
        raise HTTPException(status_code=404, detail="Model not found")
    return pixels


@router.post("/sdapi/v1/interrogate", response_model=InterrogateResponse, summary="Caption an image (Automatic1111)")
async def interrogate(body: InterrogateRequest, request: Request) -> dict[str, Any]:
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
    state = request.app.state.clip
    template = body.template or state.settings.label_template
    try:
        categories = parse_categories(body.categories, "categories")
        flat = category_labels(categories)
        apply_template(template, flat)  # a bad template is refused (400) before the image is read
    except UsageError as e:
        raise HTTPException(status_code=400, detail=str(e)) from e
    pixels = await read_image(request, body.image)
    bank, emb = await asyncio.gather(state.label_bank(flat, template), state.embed_images([pixels]))
    cats = CategorySet(categories, bank)
    tags = await state.tag_index()
    s = state.settings
    interrogation = tags.interrogate(emb, s.threshold, s.top)[0]
    results = cats.evaluate(emb)[0]
    return {
        "results": {name: r.to_dict(with_probs=True) for name, r in results.items()},
        "general_tags": [t.tag for t in interrogation.tags],
    }
