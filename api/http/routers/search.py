"""Questions asked with a photo: POST /search, /locate, /classify, /anomaly, /explain."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException
from fastapi.responses import Response

from catalens.api.http.fields import checked_category, image_url
from catalens.api.http.problems import problem
from catalens.api.http.schemas import (
    AnomalyResponse,
    ClassifyResponse,
    Detection,
    Hit,
    LocateResponse,
    Problem,
    SearchResponse,
)
from catalens.api.http.state import ImageFile, ServerState, SettingsDep, StateDep, read_upload
from catalens.api.service import ModelMissingError
from catalens.indexer.features import FeatureUnavailableError

router = APIRouter(tags=["search by photo"])
# A query is a few words; a page of text is not one.
MAX_TEXT_CHARS = 500

_ERRORS = {
    400: {"model": Problem, "description": "the photo cannot be decoded (truncated, corrupt)"},
    413: {"model": Problem, "description": "the photo is larger than the upload limit (bytes or pixels)"},
    415: {"model": Problem, "description": "the upload is not an image"},
    422: {"model": Problem, "description": "no photo, or a parameter this index cannot use: an unknown mode or "
                                           "category, k out of range, bad weights"},
    503: {"model": Problem, "description": "what was asked needs a model this index has not fitted yet "
                                           "(the detail says which command fits it)"},
}


@router.post("/search", response_model=SearchResponse, responses=_ERRORS)
async def search(
    state: StateDep,
    settings: SettingsDep,
    image: ImageFile = None,
    category: Annotated[str | None, Form(description="only items under this category path prefix")] = None,
    text: Annotated[str | None, Form(max_length=MAX_TEXT_CHARS,
                                     description="words to search for (ids, titles, categories, attributes, words "
                                                 "read on the items' images; typos allowed): alone, or with the "
                                                 "photo as one more evidence of fused search")] = None,
) -> SearchResponse:
    """Catalog items that best match the photo, the words, or both, best first."""
    category = await checked_category(state, category)
    text = text.strip() if text and text.strip() else None
    if text is not None and image is None:
        upload = None
    else:
        upload = await read_upload(state, image)
    if text is not None and upload is not None and settings.mode not in (None, "fused"):
        raise HTTPException(422, f"words with a photo are one more evidence of fused search, not mode {settings.mode!r}")

    def run():
        started = time.perf_counter()
        with state.rw.gen_rlock():
            result = state.service.search([upload.image] if upload else [], category=category,
                                          names=[upload.name] if upload else None, text=text,
                                          **settings.model_dump(include={"k", "mode", "weights", "collapse"}))[0]
        return result, time.perf_counter() - started

    try:
        result, seconds = await state.run(run)
    except FeatureUnavailableError as error:
        raise problem(error, f"mode {settings.mode!r} is not available for this index") from None
    if result.error:
        raise HTTPException(400, result.error)
    hits = [Hit(**hit.to_json(), image_url=image_url(hit.id)) for hit in result.results or []]
    return SearchResponse(query=upload.name if upload else text, mode="text" if upload is None else settings.mode,
                          k=settings.k, category=category, match=result.match, threshold=result.threshold,
                          results=hits, seconds=round(seconds, 4))


@router.post("/locate", response_model=LocateResponse, responses=_ERRORS)
async def locate(
    state: StateDep,
    image: ImageFile = None,
    max: Annotated[int, Form(ge=1, le=100, description="at most this many detections")] = 20,
) -> LocateResponse:
    """The catalog products the photo shows, each with its box in the photo's pixels, best first
    (as `catalens locate --json`)."""
    upload = await read_upload(state, image)

    def run():
        started = time.perf_counter()
        with state.rw.gen_rlock():
            # The upload's bytes, not the reduced query image: boxes are in the photo's own pixels.
            result = state.service.locate([upload.data], names=[upload.name], max_detections=max)[0]
        return result, time.perf_counter() - started

    result, seconds = await state.run(run)
    if result.error:
        raise HTTPException(400, result.error)
    detections = [Detection(**d.to_json(), image_url=image_url(d.id)) for d in result.detections or []]
    return LocateResponse(query=upload.name, detections=detections, seconds=round(seconds, 4))


async def _ask(state: ServerState, image, method: str, feature: str) -> dict[str, Any]:
    upload = await read_upload(state, image)

    def run() -> dict[str, Any]:
        with state.rw.gen_rlock():
            return getattr(state.service, method)([upload.image], names=[upload.name])[0].to_json()

    try:
        result = await state.run(run)
    except (ModelMissingError, FeatureUnavailableError) as error:
        raise problem(error, f"{feature} is not available for this index") from None
    except ValueError as error:  # what the model refuses to answer (a ValueError of its own)
        raise HTTPException(503, f"{feature} is not available for this index: {error}") from None
    if result.get("error"):
        raise HTTPException(400, str(result["error"]))
    return result


@router.post("/classify", response_model=ClassifyResponse, responses=_ERRORS)
async def classify(state: StateDep, image: ImageFile = None) -> ClassifyResponse:
    """The proposed category path of a photo (as `catalens classify --json`)."""
    return ClassifyResponse(**await _ask(state, image, "classify", "classification"))


@router.post("/anomaly", response_model=AnomalyResponse, responses=_ERRORS)
async def anomaly(state: StateDep, image: ImageFile = None) -> AnomalyResponse:
    """Whether a photo looks unlike the catalog (as `catalens anomaly --json`); 503 until `catalens train-ae` ran."""
    return AnomalyResponse(**await _ask(state, image, "anomaly", "anomaly scoring"))


@router.post("/explain", responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": Problem}, **_ERRORS})
async def explain(
    state: StateDep,
    settings: SettingsDep,
    image: ImageFile = None,
    id: Annotated[str, Form(description="the result to explain")] = "",
    category: Annotated[str | None, Form()] = None,
) -> Response:
    """An image of the keypoints the photo and result `id` share (modes local and fused)."""
    if settings.mode not in ("local", "fused"):
        raise HTTPException(422, f"matched keypoints exist for modes local and fused, not {settings.mode!r}")
    category = await checked_category(state, category)
    upload = await read_upload(state, image)

    def run() -> bytes | None:
        with state.rw.gen_rlock():
            return state.service.explain_match(upload.image, id, category=category, k=settings.k, mode=settings.mode)

    drawn = await state.run(run)
    if drawn is None:
        raise HTTPException(404, f"{id!r} is not among the top {settings.k} results of this photo in mode {settings.mode}")
    if not drawn:
        raise HTTPException(404, f"no matched keypoints to draw for {id!r}")
    return Response(drawn, media_type="image/jpeg")
