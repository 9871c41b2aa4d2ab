"""Where an index keeps the images sent to it as bytes (``POST /items``): ``uploads/`` beside its
models, each file named by its item and its content, and written whole or not at all."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def upload_path(folder: Path, item_id: str, data: bytes, image_format: str | None) -> Path:
    """The file for ``item_id``'s image ``data``: the same bytes for the same item land on the same name."""
    digest = hashlib.sha256(data).hexdigest()[:20]
    name = hashlib.sha1(item_id.encode()).hexdigest()[:12]
    return folder / f"{name}-{digest}{FORMAT_SUFFIX.get(image_format or '', '.img')}"


def save_upload(path: Path, data: bytes) -> None:
    """Write ``data`` beside ``path`` as a ``.part`` file first, so that ``path`` is whole or absent."""
    tmp = path.with_suffix(".part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def drop_upload(folder: Path, path: Path) -> None:
    """Delete an uploaded image no item uses any more (catalog files outside ``folder`` stay)."""
    try:
        if path.resolve().parent == folder.resolve():
            path.unlink(missing_ok=True)
    except OSError as error:
        log.warning("could not delete an upload: %s", error)


def remove_orphan_uploads(folder: Path, images: Iterable[str | Path]) -> int:
    """Delete the files of ``folder`` that none of ``images`` (every item's image) is: what a write
    killed between saving the image and committing the item left behind (and its ``.part`` file).
    Run when no write is under way."""
    if not folder.is_dir():
        return 0
    used = {Path(image).name for image in images if Path(image).parent.resolve() == folder.resolve()}
    removed = 0
    for path in folder.iterdir():
        if path.is_file() and path.name not in used:
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.warning("removed %d upload(s) of writes that did not complete", removed)
    return removed
