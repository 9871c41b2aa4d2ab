"""The HTTP API and web page: search by photo, classify, anomaly check and catalog updates.

The HTTP layer only translates: it validates uploads, calls ``catalens.api.service`` (as the
CLI does) in a worker pool, and turns results and errors into typed JSON whose messages name no
server path (``problems``). Routes live in ``routers/``, what they share in ``state``. The API's
documentation pages (/docs, /redoc) load Swagger UI and ReDoc from this server, so they work offline.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from catalens.api.http.guard import (
    FORM_OVERHEAD_BYTES,
    RequestGuard,
    SecurityHeaders,
    api_key_problem,
)
from catalens.api.http.problems import PathScrubber, status_of
from catalens.api.http.routers import audit, items, search, system
from catalens.api.http.state import API_KEY_ENV, STATIC_DIR, ServerState, decode_error
from catalens.api.service import CatalogService
from catalens.errors import CatalensError
from catalens.indexer.files import disk_full
from catalens.indexer.imageio import ImageDecodeError
from catalens.search.refit import background_refit, needs_refit
from catalens.search.settings import SearchSettings, load_search_settings

log = logging.getLogger(__name__)

# A phone photo is a few MB; anything far beyond that is a mistake or an attack.
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# Uploads are product photos: a 40-megapixel limit refuses bombs early and still fits any camera.
DEFAULT_MAX_UPLOAD_PIXELS = 40_000_000
# Seconds of quiet after a write before the background refit: writes come in bursts, and a refit
# reads the whole catalog (a calibration fit of a few hundred items takes seconds).
REFIT_DELAY = 3.0

__all__ = ["API_KEY_ENV", "create_app"]

DESCRIPTION = f"""Visual search for product catalogs: find products by photo, file them into the category
tree, flag photos that do not belong, and keep the catalog up to date.

Photos are sent as multipart field `image`. Reading needs no key. Writes (`POST /items`,
`DELETE /items/{{id}}`) need the server's key (`${API_KEY_ENV}`) in the `X-API-Key` header
(the *Authorize* button), and are refused on a server started with `--read-only`.

    curl -F image=@photo.jpg -F k=5 http://127.0.0.1:8000/search
"""


# glibc's mallopt parameters: allocations of at least M_MMAP_THRESHOLD bytes are mapped, and
# unmapped when freed; an arena keeps up to M_TRIM_THRESHOLD bytes free at its top.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MAPPED_FROM_BYTES = 8 * 1024 * 1024
_KEPT_FREE_BYTES = 16 * 1024 * 1024


def return_large_buffers_to_the_os() -> None:
    """Make glibc map every buffer of 32 MiB or more (decoded photos) and unmap it when freed.

    By default glibc raises its mapping threshold after the first large free, so later photo-sized
    buffers come from per-thread arenas that keep freed memory: with 8 worker threads each arena
    holds its own worst case, and resident memory grows to several times what is in use. Setting
    the threshold once turns that adjustment off. Below 32 MiB, a search's own arrays (matching
    products of 5 MB, word scores of 6 MB) are reused from the arenas, which keep up to 64 MiB
    free: mapped afresh each time at the 4 MiB threshold used before, their page faults cost a
    search 5-13 ms (p50 48-55 against 40-42 ms, in turn in one process). A no-op where the C
    library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _MAPPED_FROM_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _KEPT_FREE_BYTES)
    except (OSError, AttributeError):
        pass


def create_app(
    location: str | Path,
    read_only: bool = False,
    api_key: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS,
    workers: int | None = None,
    settings: SearchSettings | None = None,
    refit_delay: float = REFIT_DELAY,
) -> FastAPI:
    """The FastAPI app over the index at ``location``, opened once here.

    Writes need ``api_key`` (or ``$CATALENS_API_KEY``) unless ``read_only``; without one this
    raises ``ValueError`` rather than serve an open write endpoint. What search fits on the whole
    catalog is refitted on a background thread ``refit_delay`` seconds after the last write, and
    at once where it is stale or missing at start; a read-only server keeps those fits in memory.
    """
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if not read_only and not api_key:
        raise ValueError(f"writes are enabled but no API key is set: set {API_KEY_ENV} or run read-only")
    if not read_only and api_key_problem(api_key):
        raise ValueError(f"{API_KEY_ENV}: {api_key_problem(api_key)}")
    return_large_buffers_to_the_os()
    service = CatalogService.open(location, settings or load_search_settings(), read_only=read_only)
    try:
        service.warm_up()  # so that the first visitor neither waits for it nor meets a bare 500
    except BaseException:
        service.close()
        raise
    # Import what is loaded lazily here, once: torch imported from two worker threads at the same
    # time fails half-initialised.
    import catalens.search.anomaly  # noqa: F401
    import catalens.search.classify  # noqa: F401
    import catalens.search.explain  # noqa: F401
    import catalens.search.fusion  # noqa: F401

    state = ServerState(
        service=service, read_only=read_only, api_key=api_key,
        max_upload_bytes=max_upload_bytes, max_upload_pixels=max_upload_pixels,
        # One request computing per core: each search already runs its network beside its
        # keypoints. With 8 clients on 2 cores, 2 threads answered 22-24 req/s (p95 ~400 ms)
        # where 4 answered 15-21 (p95 460-780 ms); benchmarks/bench_load.py.
        executor=ThreadPoolExecutor(max_workers=workers or max(2, os.cpu_count() or 2), thread_name_prefix="catalens"),
    )

    if not read_only:
        service.remove_orphan_uploads()  # no write is under way yet
    state.refit = background_refit(service.catalog, delay=refit_delay, store=not read_only, guard=state.rw.gen_rlock)
    if needs_refit(service.catalog):  # searches answer with the last fits (or without) meanwhile
        state.refit.poke(delay=0)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            state.refit.close()
            state.executor.shutdown(wait=True, cancel_futures=True)
            service.close()

    app = FastAPIOffline(
        title="catalens", version="0.2.0", lifespan=lifespan, static_url="/docs-static",
        description=DESCRIPTION,
    )
    app.state.catalens = state
    scrub = PathScrubber.for_location(location, service.catalog.models_dir.parent)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if isinstance(error.detail, str):
            error = StarletteHTTPException(error.status_code, scrub(error.detail), error.headers)
        return await http_exception_handler(request, error)

    @app.exception_handler(ImageDecodeError)
    async def _image_error(request: Request, error: ImageDecodeError) -> JSONResponse:
        http = decode_error(error)
        return JSONResponse({"detail": scrub(http.detail)}, status_code=http.status_code)

    async def _disk_full(request: Request, error: Exception) -> JSONResponse:
        if not disk_full(error):
            raise error
        log.error("%s %s: the disk is full (%s)", request.method, request.url.path, error)
        return JSONResponse({"detail": "the server's disk is full; try again once space is freed"}, status_code=507)

    # What a full disk raises, from Python, SQLite and faiss; any other such error stays a 500.
    for kind in (OSError, sqlite3.OperationalError, RuntimeError):
        app.add_exception_handler(kind, _disk_full)

    @app.exception_handler(CatalensError)
    async def _library_error(request: Request, error: CatalensError) -> JSONResponse:
        return JSONResponse({"detail": scrub(str(error))}, status_code=status_of(error))

    app.add_middleware(RequestGuard, max_body_bytes=max_upload_bytes + FORM_OVERHEAD_BYTES, read_only=read_only,
                       api_key=api_key)
    app.add_middleware(SecurityHeaders)  # added last, so outermost: the guard's refusals carry them too

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for router in (system.router, search.router, items.router, audit.router):
        app.include_router(router)
    return app
