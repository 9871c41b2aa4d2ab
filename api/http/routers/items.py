"""The catalog's items: GET /items/{id} and its image, POST /items, DELETE /items/{id}."""

from __future__ import annotations

import io
import mimetypes
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from catalens.api.http.fields import clean_category, image_url
from catalens.api.http.problems import problem
from catalens.api.http.schemas import DeleteResponse, Item, Problem, WriteResponse
from catalens.api.http.state import ImageFile, StateDep, WriterDep, read_upload
from catalens.api.service import ItemWrite
from catalens.datasets.catalog import (
    MAX_ATTRIBUTES_BYTES,
    CatalogItem,
    FieldError,
    check_item_id,
    item_problem,
    parse_json_field,
)
from catalens.indexer.files import disk_full
from catalens.indexer.imageio import ImageDecodeError, load_rgb

router = APIRouter(prefix="/items", tags=["catalog items"])


def item_model(record) -> Item:
    return Item(id=record.id, category=record.category, title=record.title, attributes=record.attributes,
                image_url=image_url(record.id))


def clean_id(item_id: str) -> str:
    """The id as the catalog readers accept it (``check_item_id``): every id written is reachable."""
    item_id = item_id.strip()
    problem = check_item_id(item_id)
    if problem:
        raise HTTPException(422, problem)
    return item_id


def parsed_attributes(text: str) -> dict:
    """The attributes field as a JSON object, within the catalog readers' depth and size limits."""
    try:
        attributes = parse_json_field(text or "{}", "attributes", MAX_ATTRIBUTES_BYTES)
    except FieldError as error:
        raise problem(error) from None
    if not isinstance(attributes, dict):
        raise HTTPException(422, "attributes must be a JSON object")
    return attributes


@router.get("/{item_id:path}/image", responses={200: {"content": {"image/*": {}}}, 404: {"model": Problem}})
async def item_image(request: Request, state: StateDep, item_id: str,
                     size: Annotated[int | None, Query(ge=16, le=1024)] = None) -> Response:
    """The item's catalog image; `size` gives a JPEG thumbnail at most that many pixels wide/high."""
    if not request.scope.get("raw_path", b"/image").endswith(b"/image"):
        # /items/c%2Fimage names the item "c/image"; the router sees the decoded path "c/image"
        # and would answer with the image of "c". The raw path tells them apart.
        return JSONResponse((await get_item(state, f"{item_id}/image")).model_dump())
    record = await state.run(state.service.item, item_id)
    if record is None:
        raise HTTPException(404, f"no item {item_id!r}")
    path = Path(record.image)
    if not path.is_file():
        raise HTTPException(404, f"the image of {item_id!r} is gone")
    if size is None:
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    def thumbnail() -> bytes:
        # Reduced and within the shared decode budget like a query (load_rgb's defaults): eight
        # thumbnails of a 5790 px cut-out took 1 GB decoded at full size.
        image = load_rgb(path, draft_size=size)
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()

    try:
        data = await state.run(thumbnail)
    except ImageDecodeError as error:
        raise HTTPException(404, f"the image of {item_id!r} cannot be read: {error.reason}") from None
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=300"})


@router.get("/{item_id:path}", response_model=Item, responses={404: {"model": Problem}})
async def get_item(state: StateDep, item_id: str) -> Item:
    record = await state.run(state.service.item, item_id)
    if record is None:
        raise HTTPException(404, f"no item {item_id!r}")
    return item_model(record)


@router.post("", response_model=WriteResponse, responses={401: {"model": Problem}, 403: {"model": Problem},
                                                          422: {"model": Problem}})
async def put_item(
    state: WriterDep,
    image: ImageFile = None,
    id: Annotated[str, Form(description="the catalog id; an existing id is replaced")] = "",
    category: Annotated[str, Form(description="category path, e.g. Packages/Milk")] = "",
    title: Annotated[str, Form()] = "",
    attributes: Annotated[str, Form(description="a JSON object")] = "{}",
) -> WriteResponse:
    """Add an item, or replace the one with this id; every store is updated durably."""
    # What the catalog readers refuse is refused here too, naming the field, before the photo is read.
    fields = CatalogItem(id=clean_id(id), image=Path(), category=clean_category(category) or "",
                         title=title.strip(), attributes=parsed_attributes(attributes))
    refusal = item_problem(fields)
    if refusal:
        raise HTTPException(422, refusal)
    upload = await read_upload(state, image)

    def run() -> ItemWrite:
        with state.rw.gen_wlock():
            return state.service.write_item(fields, upload.data, upload.format)

    try:
        written = await state.run(run)
    except Exception as error:
        _refuse_if_disk_full(error, "the item was not written")
        raise
    if written.failure is not None:
        raise HTTPException(400, f"the item could not be indexed: {written.failure}")
    state.written()
    return WriteResponse(status=written.status, item=item_model(written.record))


@router.delete("/{item_id:path}", response_model=DeleteResponse, responses={404: {"model": Problem}})
async def delete_item(state: WriterDep, item_id: str) -> DeleteResponse:
    """Remove an item from every store, durably."""

    def run() -> bool:
        with state.rw.gen_wlock():
            removed = state.service.delete_item(item_id)
            if removed:
                state.written()
            return removed

    try:
        removed = await state.run(run)
    except Exception as error:
        _refuse_if_disk_full(error, "the item was not removed")
        raise
    if not removed:
        raise HTTPException(404, f"no item {item_id!r}")
    return DeleteResponse(removed=item_id)


def _refuse_if_disk_full(error: Exception, what: str) -> None:
    if disk_full(error):
        raise HTTPException(507, f"the server's disk is full: {what}; try again once space is freed") from None
