"""The catalog's items: GET /items/{id} and its image, POST /items, DELETE /items/{id}."""

from __future__ import annotations

import hashlib
import io
import logging
import mimetypes
import os
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from catalens.api.http.routers.search import _FORMAT_SUFFIX, clean_category, image_url
from catalens.api.http.schemas import DeleteResponse, Item, Problem, WriteResponse
from catalens.api.http.state import ImageFile, ServerState, StateDep, Upload, WriterDep, read_upload
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
from catalens.indexer.pipeline import IndexReport

log = logging.getLogger(__name__)

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
        raise HTTPException(422, str(error)) from None
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
    record = await state.run(state.catalog.items.item_by_id, item_id)
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
    record = await state.run(state.catalog.items.item_by_id, item_id)
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
    problem = item_problem(fields)
    if problem:
        raise HTTPException(422, problem)
    upload = await read_upload(state, image)
    return await state.run(_write_item, state, fields.id, fields.category, fields.title, fields.attributes, upload)


@router.delete("/{item_id:path}", response_model=DeleteResponse, responses={404: {"model": Problem}})
async def delete_item(state: WriterDep, item_id: str) -> DeleteResponse:
    """Remove an item from every store, durably."""

    def run() -> bool:
        with state.rw.gen_wlock():
            record = state.catalog.items.item_by_id(item_id)
            try:
                removed, _ = state.service.remove([item_id])
            except Exception as error:
                if record is None or state.catalog.items.item_by_id(item_id) is not None:
                    _refuse_if_disk_full(error, "the item was not removed")
                    raise
                _committed_anyway(error, item_id)
                removed = [item_id]
            if removed:
                state.written()
            if removed and record is not None:
                _drop_upload(state, Path(record.image))
            return bool(removed)

    if not await state.run(run):
        raise HTTPException(404, f"no item {item_id!r}")
    return DeleteResponse(removed=item_id)


def _save_upload(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _holds(state: ServerState, item: CatalogItem) -> bool:
    """Whether the item store holds ``item`` as given (its image, category, title and attributes)."""
    record = state.catalog.items.item_by_id(item.id)
    return record is not None and (record.image, record.category, record.title, record.attributes) == (
        str(item.image), item.category, item.title, item.attributes)


def _refuse_if_disk_full(error: Exception, what: str) -> None:
    if disk_full(error):
        raise HTTPException(507, f"the server's disk is full: {what}; try again once space is freed") from None


def _committed_anyway(error: Exception, item_id: str) -> None:
    log.warning("%r: the write is committed to items.sqlite, but what is derived from it was not saved (%s); "
                "it is rebuilt from items.sqlite when the index is next opened", item_id, error)


def _drop_upload(state: ServerState, path: Path) -> None:
    """Delete an uploaded image no item uses any more (catalog files outside uploads/ stay)."""
    try:
        if path.resolve().parent == state.uploads_dir.resolve():
            path.unlink(missing_ok=True)
    except OSError as error:
        log.warning("could not delete an upload: %s", error)


def remove_orphan_uploads(state: ServerState) -> int:
    """Delete uploads no item uses: what a write killed between saving the image and committing
    the item left behind (and its ``.part`` file). Run before serving, when no write is under way."""
    folder = state.uploads_dir
    if not folder.is_dir():
        return 0
    used = {Path(record.image).name for record in state.catalog.items.records().values()
            if Path(record.image).parent.resolve() == folder.resolve()}
    removed = 0
    for path in folder.iterdir():
        if path.is_file() and path.name not in used:
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.warning("removed %d upload(s) of writes that did not complete", removed)
    return removed


def _write_item(state: ServerState, item_id: str, category: str, title: str, attributes: dict,
                upload: Upload) -> WriteResponse:
    state.uploads_dir.mkdir(exist_ok=True)
    digest = hashlib.sha256(upload.data).hexdigest()[:20]
    name = hashlib.sha1(item_id.encode()).hexdigest()[:12]
    path = state.uploads_dir / f"{name}-{digest}{_FORMAT_SUFFIX.get(upload.format or '', '.img')}"
    item = CatalogItem(id=item_id, image=path, category=category, title=title, attributes=attributes)
    with state.rw.gen_wlock():
        previous = state.catalog.items.item_by_id(item_id)
        saved = not path.exists()
        try:
            if saved:
                _save_upload(path, upload.data)
            report = state.service.add_items([item])
        except Exception as error:
            # The answer says what items.sqlite holds: a write whose commit failed answers an error
            # and leaves nothing; one that failed after it (a FAISS file on a full disk: derived,
            # rebuilt from items.sqlite) is written, and answered so.
            if not _holds(state, item):
                if saved:
                    path.unlink(missing_ok=True)
                _refuse_if_disk_full(error, "the item was not written")
                raise
            _committed_anyway(error, item_id)
            report = IndexReport(index=state.catalog.location, added=previous is None, updated=previous is not None)
        if report.failures:
            if previous is None or Path(previous.image) != path:
                path.unlink(missing_ok=True)
            raise HTTPException(400, f"the item could not be indexed: {report.failures[0].reason}")
        if previous is not None and Path(previous.image) != path:
            _drop_upload(state, Path(previous.image))
        record = state.catalog.items.item_by_id(item_id)
    state.written()
    status = ("added" if report.added else "updated" if report.updated
              else "metadata_updated" if report.metadata_updated else "unchanged")
    return WriteResponse(status=status, item=item_model(record))
