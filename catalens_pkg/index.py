"""The Python API: ``catalens.open(location)`` and the :class:`Index` it returns.

An ``Index`` is a thin handle over ``catalens.api.service.CatalogService``, the layer the command
line and the HTTP API use, so a script gets the same answers as ``catalens search``. It takes a
photo as a path, bytes, a PIL image or a numpy array, one at a time or a list, and answers in the
library's typed results (``QueryResult``, ``LocateResult``, ``ClassifyResult``, ``AnomalyResult``).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from catalens.api.service import CatalogService
    from catalens.indexer.pipeline import IndexReport
    from catalens.search.anomaly import AnomalyResult
    from catalens.search.classify import ClassifyResult
    from catalens.search.locate import LocateResult
    from catalens.search.query import QueryResult

Photo = str | Path | bytes | Image.Image | np.ndarray
"""What every method takes as a photo: a file path, the file's bytes, a PIL image, or an array
(height x width, or height x width x 3 or 4; uint8, or floats in [0, 1])."""

_URL = re.compile(r"^https?://", re.IGNORECASE)


class PhotoError(ValueError):
    """A photo that could not be read (missing, not an image, too large); the message says why."""


def open(location: str | Path, read_only: bool = False, **search_settings: Any) -> Index:  # noqa: A001
    """Open the index at ``location``: a folder made by ``catalens index``, or an Elasticsearch URL
    (``http://localhost:9200``, the index named by ``$CATALENS_ES_INDEX``, default ``catalens``;
    ``http://host:9200/NAME`` or ``es+http://host:9200/NAME`` to name it).

    ``search_settings`` are ``SearchSettings`` fields (``k``, ``mode``, ``weights``, ...) over those
    of ``$CATALENS_CONFIG`` and ``CATALENS_SEARCH_*``, as the command line reads them. With
    ``read_only`` nothing is written into a folder index. A folder that is not an index raises
    ``IndexUnavailableError`` with what to do.
    """
    from catalens.api.service import CatalogService
    from catalens.search.settings import load_search_settings

    settings = load_search_settings(None)
    if search_settings:
        settings = settings.merged(**search_settings)
    return Index(CatalogService.open(_location(location), settings, read_only=read_only))


def _location(location: str | Path) -> str | Path:
    """A folder as it is; an http(s) URL as the ``es+URL/INDEX`` location ``open_catalog`` reads."""
    from catalens.indexer.stores.elastic.catalog import elastic_location

    text = str(location)
    if not _URL.match(text):
        return location
    url, _, name = text.rstrip("/").partition("://")[2].partition("/")
    scheme = text.split("://", 1)[0]
    return elastic_location(f"{scheme}://{url}", name or None)


def _image(photo: Photo) -> str | Path | bytes | Image.Image:
    """``photo`` as the service takes it: arrays become PIL images, PIL images RGB."""
    if isinstance(photo, np.ndarray):
        array = photo
        if array.dtype.kind == "f":
            array = (np.clip(array, 0, 1) * 255).round()
        array = np.ascontiguousarray(array.astype(np.uint8))
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise PhotoError(f"an array photo must be HxW or HxWx3/4, not {photo.shape}")
        photo = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
    if isinstance(photo, Image.Image):
        # Decoded here, once: a lazily opened file read by the search's two threads at once breaks.
        photo.load()
        return photo if photo.mode == "RGB" else photo.convert("RGB")
    if isinstance(photo, (str, Path, bytes)):
        return photo
    raise PhotoError(f"a photo is a path, bytes, a PIL image or a numpy array, not {type(photo).__name__}")


def _batch(photos: Photo | Sequence[Photo]) -> tuple[list, bool]:
    """(the photos as a list, whether one photo was given rather than a list)."""
    if isinstance(photos, (str, Path, bytes, Image.Image, np.ndarray)):
        return [_image(photos)], True
    return [_image(photo) for photo in photos], False


def _answer(results: list, single: bool):
    """One result for one photo (its error raised as ``PhotoError``); a list, errors kept, for a list."""
    if not single:
        return results
    query, error = results[0].query, results[0].error
    if error is not None:
        raise PhotoError(error if error.startswith(query) else f"{query}: {error}")
    return results[0]


class Index:
    """An open catalens index. Use it as a context manager, or call ``close()`` when done.

    Every question takes one photo (answered with one result, a photo that cannot be read raising
    :class:`PhotoError`) or a list (answered with a list in the same order, an unreadable photo's
    result carrying ``error``).
    """

    def __init__(self, service: CatalogService):
        self.service = service

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        info = self.service.catalog.info()
        return f"<catalens.Index {info.get('location', '')!s} items={info.get('items', '?')}>"

    def close(self) -> None:
        self.service.close()

    # --- questions

    def search(self, photo: Photo | Sequence[Photo], k: int | None = None, mode: str | None = None,
               category: str | None = None, collapse: bool | None = None, **settings: Any,
               ) -> QueryResult | list[QueryResult]:
        """The catalog items that best match the photo, best first (``catalens search``).

        ``mode``: ``fused`` (default), ``local``, or a global feature (``deep``, ``colour``, ...);
        ``category``: a category path prefix of whole levels; ``collapse``: one result per product;
        ``settings``: other ``SearchSettings`` fields for this call. The result's ``match`` is the top
        result's id when its confidence reaches the mode's threshold; each of ``results`` has ``id``,
        ``score``, ``confidence``, ``category`` and ``title``.
        """
        images, single = _batch(photo)
        results = self.service.search(images, category=category, k=k, mode=mode, collapse=collapse, **settings)
        return _answer(results, single)

    def locate(self, photo: Photo | Sequence[Photo], max: int = 20) -> LocateResult | list[LocateResult]:  # noqa: A002
        """Each catalog product the photo shows, with its box ``(x0, y0, x1, y1)`` in the photo's
        pixels, best first, at most ``max`` (``catalens locate``): ``result.detections``."""
        images, single = _batch(photo)
        return _answer(self.service.locate(images, max_detections=max), single)

    def classify(self, photo: Photo | Sequence[Photo]) -> ClassifyResult | list[ClassifyResult]:
        """The proposed category path (``catalens classify``): ``guess`` is the most probable leaf,
        ``levels`` each level's confidence, ``category`` the deepest level that is sure (or
        ``unknown``)."""
        images, single = _batch(photo)
        return _answer(self.service.classify(images), single)

    def anomaly(self, photo: Photo | Sequence[Photo]) -> AnomalyResult | list[AnomalyResult]:
        """How badly the index's autoencoder reconstructs the photo (``catalens anomaly``; needs
        ``catalens train-ae``): ``score``, ``threshold``, ``anomalous``."""
        images, single = _batch(photo)
        return _answer(self.service.anomaly(images), single)

    def info(self) -> dict[str, Any]:
        """What ``catalens info --json`` prints: counts, configuration, modes and their match
        thresholds, what is fitted and whether it is stale."""
        return self.service.info()

    # --- changes

    def add(self, photo: Photo, id: str, category: str = "", title: str = "",  # noqa: A002
            attributes: dict[str, Any] | None = None, refit: bool = True) -> IndexReport:
        """Add or replace the item ``id``. A path is indexed where it lies; bytes, a PIL image or an
        array are saved first into the index's ``uploads/`` (as ``POST /items`` does). With ``refit``, the classifier and
        the match calibration are refitted where the change made them stale (as ``catalens index``
        does at its end)."""
        from catalens.datasets.catalog import CatalogItem

        image = _image(photo)
        if not isinstance(image, (str, Path)):
            image = self._save_upload(id, image)
        item = CatalogItem(id=id, image=Path(image), category=category, title=title, attributes=attributes or {})
        report = self.service.add_items([item])
        if report.failures:
            raise PhotoError(f"{id}: {report.failures[0]}")
        if refit:
            self.service.refit()
        return report

    def remove(self, *ids: str, refit: bool = True) -> list[str]:
        """Delete items by id; returns the ids that were not in the index."""
        _, missing = self.service.remove(list(ids))
        if refit:
            self.service.refit()
        return missing

    def _save_upload(self, item_id: str, image: bytes | Image.Image) -> Path:
        uploads = self.service.uploads_dir  # where POST /items keeps its images
        uploads.mkdir(exist_ok=True)
        if isinstance(image, bytes):
            image = Image.open(io.BytesIO(image))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", item_id)[:64]
        path = uploads / f"{name}-{hashlib.sha256(buffer.getvalue()).hexdigest()[:12]}.png"
        path.write_bytes(buffer.getvalue())
        return path
