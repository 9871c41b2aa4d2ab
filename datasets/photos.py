"""Lists of photos without labels: a folder of photos, or a file naming one photo path a line.

What ``catalens finetune --unlabeled`` reads: a shop's own shelf and basket photos, which nobody
labels. A relative path in a list file is read from the list's own folder.
"""

from __future__ import annotations

from pathlib import Path

from catalens.datasets.catalog import IMAGE_SUFFIXES, CatalogError, _listed_files


def read_photo_list(source: str | Path) -> list[Path]:
    """The photos of a folder (every image below it, sorted) or of a list file (in its order).

    A source that holds no photo is a ``CatalogError`` naming it: an empty list would silently
    train on nothing."""
    source = Path(source)
    if source.is_dir():
        photos = [path for path in _listed_files(source) if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()]
        if not photos:
            raise CatalogError(f"{source}: no photos found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        return photos
    if not source.is_file():
        raise CatalogError(f"{source}: no such folder or file")
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise CatalogError(f"{source}: not a UTF-8 text file of photo paths ({error.reason} at byte {error.start})") from None
    photos = [(source.parent / line.strip()) if not Path(line.strip()).is_absolute() else Path(line.strip())
              for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not photos:
        raise CatalogError(f"{source}: lists no photo (one path a line)")
    return photos
