"""The HTTP API and web page: search by photo, classify, anomaly check and catalog updates.

The HTTP layer only translates: it validates uploads, calls the same functions as the CLI
(``SearchEngine``, ``search.classify``, ``search.anomaly``, ``index_catalog``, ``remove_items``)
in a worker pool, and turns their results and errors into typed JSON.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib
import io
import json
import logging
import mimetypes
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field

from indexer.imageio import ImageDecodeError, load_rgb
from indexer.index import CatalogIndex, IndexUnavailableError

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
API_KEY_ENV = "CATALENS_API_KEY"
# A phone photo is a few MB; anything far beyond that is a mistake or an attack.
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# Uploads are product photos: a 40-megapixel limit refuses bombs early and still fits any camera.
DEFAULT_MAX_UPLOAD_PIXELS = 40_000_000
MAX_K = 100
_FORMAT_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}

T = TypeVar("T")


# --- response models ---------------------------------------------------------------------------


class Hit(BaseModel):
    id: str
    score: float
    category: str
    title: str
    image_url: str = Field(description="where to fetch the item's catalog image")


class SearchResponse(BaseModel):
    query: str
    mode: str
    k: int
    category: str | None = None
    results: list[Hit]
    seconds: float


class Item(BaseModel):
    id: str
    category: str
    title: str
    attributes: dict[str, Any]
    image_url: str


class WriteResponse(BaseModel):
    status: str = Field(description="added | updated | metadata_updated | unchanged")
    item: Item


class DeleteResponse(BaseModel):
    removed: str


class Features(BaseModel):
    classify: bool
    anomaly: bool
    explain: bool


class Stats(BaseModel):
    items: int
    categories: int
    failures: int
    backbone: str
    dims: dict[str, int]
    faiss_factory: str
    size_bytes: int
    modes: list[str]
    default_mode: str
    features: Features
    read_only: bool
    top_categories: dict[str, int]


class Health(BaseModel):
    status: str
    items: int


# --- concurrency -------------------------------------------------------------------------------


class ReadWriteLock:
    """Many readers or one writer; a waiting writer holds new readers back so it is not starved."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._condition:
            while self._writer or self._writers_waiting:
                self._condition.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                self._condition.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._condition:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._condition.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._condition:
                self._writer = False
                self._condition.notify_all()


@dataclass
class ServerState:
    """What every request shares: the index opened once, its engine, the locks and the pool."""

    index: CatalogIndex
    read_only: bool
    api_key: str | None
    max_upload_bytes: int
    max_upload_pixels: int
    executor: ThreadPoolExecutor
    rw: ReadWriteLock = field(default_factory=ReadWriteLock)
    # The deep extractor's OpenVINO runner keeps one infer request, which is not thread-safe:
    # model work is serialised, while decoding and request handling stay parallel.
    compute: threading.Lock = field(default_factory=threading.Lock)
    engine: Any = None

    @property
    def uploads_dir(self) -> Path:
        return self.index.root / "uploads"

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)


# --- helpers -----------------------------------------------------------------------------------


def image_url(item_id: str) -> str:
    return f"/items/{quote(item_id, safe='')}/image"


def _item(record) -> Item:
    return Item(
        id=record.id, category=record.category, title=record.title,
        attributes=record.attributes, image_url=image_url(record.id),
    )


OPTIONAL_MODULES = ("search.classify", "search.anomaly", "search.explain")


def _optional_module(name: str):
    """An optional feature module, or None when it is not part of this build (yet)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        return None


def _feature_unavailable(feature: str, module: str) -> HTTPException:
    return HTTPException(503, f"{feature} is not available in this build (module {module} is missing)")


def _decode_error(error: ImageDecodeError) -> HTTPException:
    reason = error.reason
    if reason.startswith("not an image"):
        return HTTPException(415, f"upload is not an image: {reason}")
    if "too large" in reason:
        return HTTPException(413, f"upload refused: {reason}")
    return HTTPException(400, f"upload cannot be decoded: {reason}")


@dataclass
class Upload:
    name: str
    data: bytes
    image: Image.Image
    format: str | None


async def _read_upload(state: ServerState, upload: UploadFile | None) -> Upload:
    if upload is None:
        raise HTTPException(422, "no image file in the request (send it as multipart field 'image')")
    content_type = (upload.content_type or "").lower()
    if content_type and not (content_type.startswith("image/") or content_type == "application/octet-stream"):
        raise HTTPException(415, f"upload is not an image (content type {content_type})")
    data = await upload.read(state.max_upload_bytes + 1)
    if len(data) > state.max_upload_bytes:
        raise HTTPException(413, f"upload larger than the {state.max_upload_bytes} byte limit")
    try:
        image = await state.run(load_rgb, data, state.max_upload_pixels)
    except ImageDecodeError as error:
        raise _decode_error(error) from None
    except (OSError, SyntaxError, ValueError) as error:
        # PIL can fail while still reading a header (a JPEG cut short), before load_rgb's checks.
        raise HTTPException(400, f"upload cannot be decoded: truncated or corrupt image ({error})") from None
    try:
        image_format = Image.open(io.BytesIO(data)).format
    except Exception:  # noqa: BLE001 - the bytes decoded above; the format name is cosmetic
        image_format = None
    return Upload(upload.filename or "<upload>", data, image, image_format)


def _check_mode(mode: str | None) -> str:
    from search.engine import available_modes, default_mode

    mode = mode or default_mode()
    if mode not in available_modes():
        raise HTTPException(422, f"unknown mode {mode!r}; choose one of {', '.join(available_modes())}")
    return mode


def _clean_id(item_id: str) -> str:
    item_id = item_id.strip()
    if not item_id or len(item_id) > 512 or any(ord(ch) < 32 for ch in item_id):
        raise HTTPException(422, "id must be 1-512 printable characters")
    return item_id


def _clean_category(category: str) -> str:
    return "/".join(part.strip() for part in category.replace("\\", "/").split("/") if part.strip())


def get_state(request: Request) -> ServerState:
    return request.app.state.catalens


StateDep = Annotated[ServerState, Depends(get_state)]


def require_writer(state: StateDep, x_api_key: Annotated[str | None, Header()] = None) -> ServerState:
    """Write endpoints: refused on a read-only server, and without the right X-API-Key."""
    if state.read_only:
        raise HTTPException(403, "this server is read-only")
    if not x_api_key or not hmac.compare_digest(x_api_key.encode(), (state.api_key or "").encode()):
        raise HTTPException(401, "missing or wrong API key (send it in the X-API-Key header)")
    return state


WriterDep = Annotated[ServerState, Depends(require_writer)]
ImageFile = Annotated[UploadFile | None, File(description="the photo")]


# --- the app -----------------------------------------------------------------------------------


def create_app(
    index_dir: str | Path,
    read_only: bool = False,
    api_key: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS,
    workers: int | None = None,
) -> FastAPI:
    """The FastAPI app over the index in ``index_dir``, opened once here.

    Writes need ``api_key`` (or ``$CATALENS_API_KEY``) unless ``read_only``; without one this
    raises ``ValueError`` rather than serve an open write endpoint.
    """
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if not read_only and not api_key:
        raise ValueError(f"writes are enabled but no API key is set: set {API_KEY_ENV} or run read-only")
    index = CatalogIndex.open(index_dir)
    # Import everything heavy here, once: torch imported from two worker threads at the same
    # time fails half-initialised, and optional modes register themselves on import.
    import indexer.deep  # noqa: F401
    import indexer.maintenance  # noqa: F401
    import indexer.pipeline  # noqa: F401
    from search.engine import SearchEngine, available_modes

    available_modes()
    for name in OPTIONAL_MODULES:
        _optional_module(name)

    state = ServerState(
        index=index, read_only=read_only, api_key=api_key,
        max_upload_bytes=max_upload_bytes, max_upload_pixels=max_upload_pixels,
        executor=ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2) * 2), thread_name_prefix="catalens"),
    )
    state.engine = SearchEngine(index)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load the network now so the first visitor does not wait for it.
        warm = state.executor.submit(index.deep_extractor)
        try:
            yield
        finally:
            warm.cancel()
            state.executor.shutdown(wait=True, cancel_futures=True)
            index.close()

    app = FastAPI(
        title="catalens",
        version="0.1.0",
        description="Visual search for product catalogs: find products by photo, file them, flag anomalies.",
        lifespan=lifespan,
    )
    app.state.catalens = state

    @app.exception_handler(ImageDecodeError)
    async def _image_error(request: Request, error: ImageDecodeError) -> JSONResponse:
        http = _decode_error(error)
        return JSONResponse({"detail": http.detail}, status_code=http.status_code)

    @app.exception_handler(IndexUnavailableError)
    async def _index_error(request: Request, error: IndexUnavailableError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=503)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        # Refuse an oversized body before the multipart parser spools it to disk.
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > state.max_upload_bytes + 1024 * 1024:
            return JSONResponse({"detail": f"request larger than the {state.max_upload_bytes} byte upload limit"}, status_code=413)
        return await call_next(request)

    # --- pages

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health", response_model=Health)
    async def health(state: StateDep) -> Health:
        count = await state.run(state.index.store.count)
        return Health(status="ok", items=count)

    @app.get("/stats", response_model=Stats)
    async def stats(state: StateDep) -> Stats:
        from search.engine import available_modes, default_mode

        def collect() -> dict[str, Any]:
            with state.rw.read():
                info = state.index.info()
                categories = state.index.store.categories()
            top = dict(sorted(categories.items(), key=lambda pair: -pair[1])[:50])
            return {**info, "top_categories": top}

        info = await state.run(collect)
        return Stats(
            items=info["items"], categories=info["categories"], failures=info["failures"],
            backbone=info["backbone"], dims=info["dims"], faiss_factory=info["faiss_factory"],
            size_bytes=info["size_bytes"], modes=available_modes(), default_mode=default_mode(),
            features=Features(
                classify=_optional_module("search.classify") is not None,
                anomaly=_optional_module("search.anomaly") is not None,
                explain=_optional_module("search.explain") is not None,
            ),
            read_only=state.read_only, top_categories=info["top_categories"],
        )

    # --- search, classify, anomaly

    @app.post("/search", response_model=SearchResponse)
    async def search(
        state: StateDep,
        image: ImageFile = None,
        k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
        mode: Annotated[str | None, Form()] = None,
        category: Annotated[str | None, Form()] = None,
    ) -> SearchResponse:
        """Catalog items that best match the photo, best first (a `category` prefix filters)."""
        upload = await _read_upload(state, image)
        mode = _check_mode(mode)
        category = _clean_category(category) if category else None

        def run() -> tuple[Any, float]:
            import time

            started = time.perf_counter()
            with state.rw.read(), state.compute:
                result = state.engine.search([upload.image], k=k, mode=mode, category=category, names=[upload.name])[0]
            return result, time.perf_counter() - started

        try:
            result, seconds = await state.run(run)
        except IndexUnavailableError:
            raise
        except RuntimeError as error:
            # A mode whose model the index lacks (e.g. ``ae`` before an autoencoder is trained).
            raise HTTPException(503, f"mode {mode!r} is not available for this index: {error}") from None
        if result.error:
            raise HTTPException(400, result.error)
        hits = [Hit(**hit.to_json(), image_url=image_url(hit.id)) for hit in result.results or []]
        return SearchResponse(query=upload.name, mode=mode, k=k, category=category, results=hits, seconds=round(seconds, 4))

    async def _optional_feature(state: ServerState, image: UploadFile | None, module_name: str, function: str, feature: str) -> dict[str, Any]:
        upload = await _read_upload(state, image)
        module = _optional_module(module_name)
        if module is None:
            raise _feature_unavailable(feature, module_name)

        def run() -> dict[str, Any]:
            with state.rw.read(), state.compute:
                return getattr(module, function)(state.index, [upload.image], names=[upload.name])[0].to_json()

        try:
            result = await state.run(run)
        except (IndexUnavailableError, ImageDecodeError):
            raise
        except (RuntimeError, ValueError, FileNotFoundError) as error:
            # What these modules raise when the index has no fitted model for them.
            log.info("%s unavailable: %s", feature, error)
            raise HTTPException(503, f"{feature} is not available for this index: {error}") from None
        if isinstance(result, dict) and result.get("error"):
            raise HTTPException(400, str(result["error"]))
        return result

    @app.post("/classify", response_model=dict[str, Any])
    async def classify(state: StateDep, image: ImageFile = None) -> dict[str, Any]:
        """The proposed category path of a photo (as `catalens classify --json`)."""
        return await _optional_feature(state, image, "search.classify", "classify", "classification")

    @app.post("/anomaly", response_model=dict[str, Any])
    async def anomaly(state: StateDep, image: ImageFile = None) -> dict[str, Any]:
        """Whether a photo looks unlike the catalog (as `catalens anomaly --json`)."""
        return await _optional_feature(state, image, "search.anomaly", "score_anomalies", "anomaly scoring")

    @app.post("/explain", responses={200: {"content": {"image/jpeg": {}}}})
    async def explain(
        state: StateDep,
        image: ImageFile = None,
        id: Annotated[str, Form()] = "",
        mode: Annotated[str | None, Form()] = None,
        k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
        category: Annotated[str | None, Form()] = None,
    ) -> Response:
        """An image of the keypoints the photo and result `id` share (modes local and fused)."""
        upload = await _read_upload(state, image)
        mode = _check_mode(mode)
        if mode not in ("local", "fused"):
            raise HTTPException(422, f"matched keypoints exist for modes local and fused, not {mode!r}")
        module = _optional_module("search.explain")
        if module is None:
            raise _feature_unavailable("explanation", "search.explain")
        category = _clean_category(category) if category else None

        def run() -> bytes | None:
            # write_explanations reads the query from the path named in the result.
            with tempfile.TemporaryDirectory(prefix="catalens-explain-") as folder:
                query_path = Path(folder) / f"query{_FORMAT_SUFFIX.get(upload.format or '', '.img')}"
                query_path.write_bytes(upload.data)
                with state.rw.read(), state.compute:
                    result = state.engine.search([upload.image], k=k, mode=mode, category=category, names=[str(query_path)])[0]
                    hits = [hit for hit in result.results or [] if hit.id == id]
                    if not hits:
                        return None
                    result.results = hits
                    drawn = module.write_explanations(state.engine, result, Path(folder) / "out")
                if not drawn:
                    return b""
                return Path(drawn[0]).read_bytes()

        drawn = await state.run(run)
        if drawn is None:
            raise HTTPException(404, f"{id!r} is not among the top {k} results of this photo in mode {mode}")
        if not drawn:
            raise HTTPException(404, f"no matched keypoints to draw for {id!r}")
        return Response(drawn, media_type="image/jpeg")

    # --- items

    @app.get("/items/{item_id:path}/image", responses={200: {"content": {"image/*": {}}}})
    async def item_image(
        state: StateDep, item_id: str, size: Annotated[int | None, Query(ge=16, le=1024)] = None
    ) -> Response:
        """The item's catalog image; `size` gives a JPEG thumbnail at most that many pixels wide/high."""
        record = await state.run(state.index.store.item_by_id, item_id)
        if record is None:
            raise HTTPException(404, f"no item {item_id!r}")
        path = Path(record.image)
        if not path.is_file():
            raise HTTPException(404, f"the image of {item_id!r} is gone from {path}")
        if size is None:
            media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            return FileResponse(path, media_type=media_type)

        def thumbnail() -> bytes:
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

    @app.get("/items/{item_id:path}", response_model=Item)
    async def get_item(state: StateDep, item_id: str) -> Item:
        record = await state.run(state.index.store.item_by_id, item_id)
        if record is None:
            raise HTTPException(404, f"no item {item_id!r}")
        return _item(record)

    @app.post("/items", response_model=WriteResponse)
    async def put_item(
        state: WriterDep,
        image: ImageFile = None,
        id: Annotated[str, Form(description="the catalog id; an existing id is replaced")] = "",
        category: Annotated[str, Form(description="category path, e.g. Packages/Milk")] = "",
        title: Annotated[str, Form()] = "",
        attributes: Annotated[str, Form(description="a JSON object")] = "{}",
    ) -> WriteResponse:
        """Add an item, or replace the one with this id; every index is updated and saved."""
        item_id = _clean_id(id)
        try:
            attrs = json.loads(attributes or "{}")
        except json.JSONDecodeError as error:
            raise HTTPException(422, f"attributes must be a JSON object ({error.msg})") from None
        if not isinstance(attrs, dict):
            raise HTTPException(422, "attributes must be a JSON object")
        upload = await _read_upload(state, image)
        return await state.run(_write_item, state, item_id, _clean_category(category), title.strip(), attrs, upload)

    @app.delete("/items/{item_id:path}", response_model=DeleteResponse)
    async def delete_item(state: WriterDep, item_id: str) -> DeleteResponse:
        """Remove an item from every index, durably."""
        from indexer.maintenance import remove_items

        def run() -> bool:
            with state.rw.write(), state.index.lock:
                record = state.index.store.item_by_id(item_id)
                removed, _ = remove_items(state.index, [item_id])
                if removed and record is not None:
                    _drop_upload(state, Path(record.image))
                return bool(removed)

        if not await state.run(run):
            raise HTTPException(404, f"no item {item_id!r}")
        return DeleteResponse(removed=item_id)

    return app


def _drop_upload(state: ServerState, path: Path) -> None:
    """Delete an uploaded image no item uses any more (catalog files outside uploads/ stay)."""
    try:
        if path.resolve().parent == state.uploads_dir.resolve():
            path.unlink(missing_ok=True)
    except OSError as error:
        log.warning("could not delete %s: %s", path, error)


def _write_item(state: ServerState, item_id: str, category: str, title: str, attributes: dict, upload: Upload) -> WriteResponse:
    from datasets.catalog import CatalogItem
    from indexer.pipeline import index_catalog

    state.uploads_dir.mkdir(exist_ok=True)
    digest = hashlib.sha256(upload.data).hexdigest()[:20]
    name = hashlib.sha1(item_id.encode()).hexdigest()[:12]
    path = state.uploads_dir / f"{name}-{digest}{_FORMAT_SUFFIX.get(upload.format or '', '.img')}"
    with state.rw.write(), state.index.lock:
        previous = state.index.store.item_by_id(item_id)
        if not path.exists():
            tmp = path.with_suffix(".part")
            tmp.write_bytes(upload.data)
            os.replace(tmp, path)
        item = CatalogItem(id=item_id, image=path, category=category, title=title, attributes=attributes)
        report = index_catalog([item], state.index, prune=False, progress=False)
        if report.failures:
            if previous is None or Path(previous.image) != path:
                path.unlink(missing_ok=True)
            raise HTTPException(400, f"the item could not be indexed: {report.failures[0].reason}")
        if previous is not None and Path(previous.image) != path:
            _drop_upload(state, Path(previous.image))
        record = state.index.store.item_by_id(item_id)
    if report.added:
        status = "added"
    elif report.updated:
        status = "updated"
    elif report.metadata_updated:
        status = "metadata_updated"
    else:
        status = "unchanged"
    return WriteResponse(status=status, item=_item(record))
