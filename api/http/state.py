"""What every request shares, and what routes receive through ``Depends``: the open catalog's
service, the locks, the worker pool, the caller's write permission, uploads and search settings."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.security import APIKeyHeader
from PIL import Image
from pydantic import ValidationError
from readerwriterlock import rwlock

from catalens.api.http.guard import write_refusal
from catalens.api.http.problems import status_of
from catalens.api.service import CatalogService
from catalens.datasets.catalog import IMAGE_FORMATS, parse_json_field
from catalens.indexer.fitted import BackgroundRefit
from catalens.indexer.imageio import ImageDecodeError, load_query
from catalens.search.settings import SearchSettings

T = TypeVar("T")

API_KEY_ENV = "CATALENS_API_KEY"
STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
MAX_K = 100
# A weight per feature: a few dozen bytes; the limit keeps the parse trivial.
MAX_WEIGHTS_BYTES = 4096


@dataclass
class ServerState:
    """The catalog opened once, its service, the locks and the worker pool."""

    service: CatalogService
    read_only: bool
    api_key: str | None
    max_upload_bytes: int
    max_upload_pixels: int
    executor: ThreadPoolExecutor
    # Many searches at once, or one write; a waiting writer holds new searches back.
    rw: rwlock.RWLockWrite = field(default_factory=rwlock.RWLockWrite)
    # Fits what search uses on the whole catalog a while after writes, never inside a request.
    refit: BackgroundRefit | None = None

    @property
    def catalog(self):
        return self.service.catalog

    def written(self) -> None:
        """After a write: the catalog's fitted models are refitted in the background, debounced."""
        if self.refit is not None:
            self.refit.poke()

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)


def get_state(request: Request) -> ServerState:
    """The server's state, the catalog caught up with what other processes (a CLI ``index`` or
    ``remove``, another server) wrote to the index: checked at most once a second, in FastAPI's
    thread pool (a plain ``def`` dependency), so a reload never holds the event loop."""
    state = request.app.state.catalens
    state.catalog.catch_up()
    return state


StateDep = Annotated[ServerState, Depends(get_state)]
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description=f"the server's key (${API_KEY_ENV})")


def require_writer(state: StateDep, key: Annotated[str | None, Depends(api_key_header)] = None) -> ServerState:
    """Write endpoints: refused on a read-only server, and without the right X-API-Key.

    ``RequestGuard`` refuses such writes before their body is read; this dependency declares the
    key in the OpenAPI document and holds the rule for an app mounted without the guard."""
    refusal = write_refusal(state.read_only, state.api_key, key)
    if refusal is not None:
        raise HTTPException(*refusal)
    return state


WriterDep = Annotated[ServerState, Depends(require_writer)]


def search_settings(
    state: StateDep,
    k: Annotated[int | None, Form(ge=1, le=MAX_K, description=f"results per photo (default: the server's [search] k, "
                                                              f"at most {MAX_K}; else 10)")] = None,
    mode: Annotated[str | None, Form(description="fused (default), local, or a global feature: deep, colour, ...")] = None,
    weights: Annotated[str | None, Form(description='fused search: a JSON object of feature weights, e.g. {"deep": 1, "sift": 0.5}')] = None,
    collapse: Annotated[bool | None, Form(description="one result per product (its best item)")] = None,
) -> SearchSettings:
    """The server's search settings with this request's ``k``, ``mode`` and ``weights``; what cannot be used is a 422."""
    from catalens.search.engine import ModeUnavailableError

    parsed = None
    if weights:
        try:
            parsed = parse_json_field(weights, "weights", MAX_WEIGHTS_BYTES, max_depth=1)
            state.service.engine.weights(state.service.settings.merged(weights=parsed))
        except ValidationError as error:
            issue = error.errors()[0]
            where = ".".join(str(part) for part in issue["loc"][1:])
            raise HTTPException(422, f"weights: {where + ': ' if where else ''}"
                                     f"{issue['msg'].removeprefix('Value error, ')}") from None
        except ValueError as error:  # FieldError (size, depth, JSON), or a feature the index lacks
            raise HTTPException(422, f"weights: {str(error).removeprefix('weights: ').splitlines()[0]}") from None
    # No k in the request: the server's own setting (--config, $CATALENS_SEARCH_K), within what one request may ask.
    k = min(state.service.settings.k, MAX_K) if k is None else k
    settings = state.service.settings.merged(k=k, mode=mode, weights=parsed, collapse=collapse)
    try:
        state.service.engine.check_mode(settings.mode)
    except ModeUnavailableError as error:
        raise HTTPException(status_of(error), str(error).replace("--mode ", "mode ")) from None
    return settings.merged(mode=settings.mode or "fused")


SettingsDep = Annotated[SearchSettings, Depends(search_settings)]
async def single_image(request: Request,
                       image: Annotated[UploadFile | None, File(description="the photo")] = None) -> UploadFile | None:
    """The photo part of the form; a 422 where the form sends a field twice (two photos: the parser
    keeps the last one, and the client may have meant the first)."""
    form = await request.form()  # parsed once for the route already: this is the same form
    repeated = sorted(key for key in form.keys() if len(form.getlist(key)) > 1)
    if repeated:
        raise HTTPException(422, f"the form sends {', '.join(map(repr, repeated))} more than once; send each field once")
    return image


ImageFile = Annotated[UploadFile | None, Depends(single_image)]


def decode_error(error: ImageDecodeError) -> HTTPException:
    reason = error.reason
    if reason.startswith("not an image"):
        return HTTPException(415, f"upload is not an image: {reason}")
    if "too large" in reason:
        return HTTPException(413, f"upload refused: {reason}")
    if "too elongated" in reason or "too many scans" in reason:
        # Decodable, but what decoding or the features would cost is refused: not a size or a damage.
        return HTTPException(422, f"upload refused: {reason}")
    return HTTPException(400, f"upload cannot be decoded: {reason}")


@dataclass
class Upload:
    name: str
    data: bytes
    image: Image.Image
    format: str | None


async def read_upload(state: ServerState, upload: UploadFile | None) -> Upload:
    if upload is None:
        raise HTTPException(422, "no image file in the request (send it as multipart field 'image')")
    content_type = (upload.content_type or "").lower()
    if content_type and not (content_type.startswith("image/") or content_type == "application/octet-stream"):
        raise HTTPException(415, f"upload is not an image (content type {content_type})")
    data = await upload.read(state.max_upload_bytes + 1)
    if len(data) > state.max_upload_bytes:
        raise HTTPException(413, f"upload larger than the {state.max_upload_bytes} byte limit")
    try:
        image = await state.run(load_query, data, state.max_upload_pixels)
    except ImageDecodeError as error:
        raise decode_error(error) from None
    except (OSError, SyntaxError, ValueError) as error:
        # PIL can fail while still reading a header (a JPEG cut short), before load_rgb's checks.
        raise HTTPException(400, f"upload cannot be decoded: truncated or corrupt image ({error})") from None
    try:
        image_format = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS).format
    except Exception:  # noqa: BLE001 - the bytes decoded above; the format name is cosmetic
        image_format = None
    return Upload(upload.filename or "<upload>", data, image, image_format)
