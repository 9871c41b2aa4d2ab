"""Catalog readers: a folder tree whose folders are the category path, or a JSONL manifest."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from catalens.errors import InputError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
# The image formats decoded, as Pillow names them (a camera's two-view MPO file opens as JPEG).
# Pillow opens forty more; those are refused before any of their code reads the file (EPS hands it
# to Ghostscript, an interpreter of untrusted PostScript).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM")


# One limit for every reader and the HTTP API: an id is a URL path, a table cell, a log line.
MAX_ID_CHARS = 512
# Category paths are a few levels of short names; the caps keep checking a filter linear and small.
MAX_CATEGORY_CHARS = 1024
MAX_CATEGORY_LEVELS = 32
# Attributes are a flat record (product, brand, size...): far below what a JSON parser's recursion
# or a request's memory notices.
MAX_JSON_DEPTH = 16
MAX_ATTRIBUTES_BYTES = 64 * 1024
# A manifest line holds one item; anything longer is not a catalog line.
MAX_MANIFEST_LINE_BYTES = 1024 * 1024

# C0 and C1 control characters (NUL, newline, escape: they break tables, logs and terminals), and
# the bidirectional embedding, override and isolate controls, which make a stored name display as
# another one.
_REFUSED_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_REFUSED_IN_PROSE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


class CatalogError(InputError, ValueError):
    """A catalog that cannot be read: the message names the file (and line) and the reason."""


class FieldError(InputError, ValueError):
    """A value catalens will not store or search by (an id, category, title, attribute, JSON field):
    the message names the field and the reason."""


@dataclass(frozen=True)
class CatalogItem:
    """One catalog entry: a product image with its category path (``Top/Coarse/Fine``)."""

    id: str
    image: Path
    category: str = ""
    title: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_json(self, relative_to: Path | None = None) -> dict[str, Any]:
        """The item as a manifest line; the image path relative to ``relative_to`` where it lies below it."""
        record = asdict(self)
        image = Path(self.image).absolute()
        if relative_to is not None and image.is_relative_to(relative_to):
            image = image.relative_to(relative_to)
        record["image"] = image.as_posix()
        return record


def _normalise_category(category: str) -> str:
    return "/".join(part for part in category.replace("\\", "/").split("/") if part)


def _listed_files(root: Path) -> list[Path]:
    """Every file below ``root``, following folder links once each. A folder that cannot be listed
    is a ``CatalogError`` naming it: a partial listing would make its items look deleted."""

    def unreadable(error: OSError) -> None:
        raise CatalogError(f"{error.filename}: cannot list this folder of the catalog ({error.strerror}); "
                           "fix its permissions, or move it out of the catalog") from None

    files, seen = [], set()
    for folder, subfolders, names in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree
            subfolders.clear()
            continue
        seen.add(real)
        files.extend(Path(folder) / name for name in names)
    return sorted(files)


def _shown(value: str, limit: int = 60) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def text_problem(field: str, value: str, prose: bool = False) -> str | None:
    """Why ``value`` cannot be stored as ``field``, or None: a control character or a bidirectional
    control. ``prose`` (attribute values) lets tabs and line breaks through."""
    found = (_REFUSED_IN_PROSE if prose else _REFUSED_CHARACTERS).search(value)
    if found is None:
        return None
    character = found.group()
    kind = "bidirectional control" if character >= "\u202a" else "control character"
    return f"{field} {_shown(value)} contains the {kind} {character!r}"


def check_item_id(item_id: str) -> str | None:
    """Why ``item_id`` cannot be a catalog id, or None. Control characters (a newline in a folder
    name) break every table and log line; a '.' or '..' level cannot be sent in a URL path, so the
    HTTP API could not reach the item."""
    if not item_id.strip():
        return "an id must not be blank"
    if len(item_id) > MAX_ID_CHARS:
        return f"id {_shown(item_id)} has {len(item_id)} characters; an id has at most {MAX_ID_CHARS}"
    problem = text_problem("id", item_id)
    if problem:
        return problem
    if item_id != item_id.strip():
        return f"id {item_id!r} starts or ends with white space"
    if any(level in (".", "..") for level in item_id.split("/")):
        return f"id {item_id!r} has a '.' or '..' level, which a URL path cannot carry"
    return None


def check_category_path(category: str, field: str = "category") -> str | None:
    """Why ``category`` (a path of levels joined by '/') cannot be stored or searched by, or None:
    over ``MAX_CATEGORY_CHARS`` characters or ``MAX_CATEGORY_LEVELS`` levels, or a refused character."""
    if len(category) > MAX_CATEGORY_CHARS:
        return f"{field} has {len(category)} characters; a category path has at most {MAX_CATEGORY_CHARS}"
    levels = category.count("/") + 1
    if levels > MAX_CATEGORY_LEVELS:
        return f"{field} has {levels} levels; a category path has at most {MAX_CATEGORY_LEVELS}"
    return text_problem(field, category)


def json_depth(value: Any) -> int:
    """How deeply ``value``'s lists and objects nest (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json_field(text: str, field: str, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``text`` parsed as JSON, within ``max_bytes`` and ``max_depth``; ``FieldError`` otherwise.
    Python's parser recurses once a level: deeper input must be a clear refusal, not a RecursionError."""
    if len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise FieldError(f"{field}: more than {max_bytes} bytes of JSON")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise FieldError(f"{field}: not valid JSON ({error.msg})") from None
    except RecursionError:
        raise FieldError(f"{field}: JSON nested more than {max_depth} levels deep") from None
    if json_depth(value) > max_depth:
        raise FieldError(f"{field}: JSON nested more than {max_depth} levels deep")
    return value


def check_attributes(attributes: dict[str, Any]) -> str | None:
    """Why ``attributes`` cannot be stored, or None: nesting over ``MAX_JSON_DEPTH``, more than
    ``MAX_ATTRIBUTES_BYTES`` as JSON, or a key or text value with a refused character."""
    if json_depth(attributes) > MAX_JSON_DEPTH:
        return f"attributes nest more than {MAX_JSON_DEPTH} levels deep"
    if len(json.dumps(attributes, ensure_ascii=False).encode("utf-8", "surrogatepass")) > MAX_ATTRIBUTES_BYTES:
        return f"attributes take more than {MAX_ATTRIBUTES_BYTES} bytes as JSON"
    stack: list[tuple[str, Any]] = [("attributes", attributes)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, dict):
            for key, child in node.items():
                problem = text_problem(f"attribute key in {where}", str(key))
                if problem:
                    return problem
                stack.append((f"{where}.{key}", child))
        elif isinstance(node, list):
            stack.extend((where, child) for child in node)
        elif isinstance(node, str):
            problem = text_problem(where, node, prose=True)
            if problem:
                return problem
    return None


def item_problem(item: CatalogItem) -> str | None:
    """Why ``item`` cannot be stored, or None; the answer names the field (id, category, title, attributes)."""
    return (check_item_id(item.id) or (check_category_path(item.category) if item.category else None)
            or text_problem("title", item.title) or check_attributes(item.attributes))


def folder_title(relative: Path) -> str:
    """The title of a folder tree's image: its leaf folder, the product (``Packages/Milk/Arla-Standard-Milk/
    IMG_0042.jpg`` is "Arla Standard Milk"). A file name is a camera's or a shoot's counter, not a name
    a person reads in search results; the id keeps it. An image beside no folder keeps its file stem."""
    name = relative.parent.name or relative.stem
    return " ".join(name.replace("_", " ").replace("-", " ").split()) or name


def read_folder_tree(root: str | Path) -> list[CatalogItem]:
    """Every image below ``root``; its folder path is the category, its relative path the id, its
    leaf folder the title (``folder_title``)."""
    root = Path(root)
    if not root.is_dir():
        raise CatalogError(f"{root}: not a folder")
    items = []
    for path in _listed_files(root):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        relative = path.relative_to(root)
        item = CatalogItem(
            id=relative.as_posix(),
            image=path.resolve(),
            category=relative.parent.as_posix() if relative.parent != Path(".") else "",
            title=folder_title(relative),
        )
        problem = item_problem(item)
        if problem:
            raise CatalogError(f"{root}: {problem}; rename it")
        items.append(item)
    if not items:
        raise CatalogError(f"{root}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return items


def read_manifest(path: str | Path) -> list[CatalogItem]:
    """Items of a JSONL manifest; relative image paths resolve against the manifest's folder.

    Whatever a line holds (bytes that are not UTF-8, JSON nested past any limit, a refused
    character), the error is one ``CatalogError`` naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"{path}: manifest not found")
    base = path.resolve().parent
    items: list[CatalogItem] = []
    first_line_of: dict[str, int] = {}
    with path.open("rb") as handle:
        for line_number, raw in enumerate(_manifest_lines(handle), start=1):
            where = f"{path}:{line_number}"
            if raw is None:
                raise CatalogError(f"{where}: a line longer than {MAX_MANIFEST_LINE_BYTES} bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise CatalogError(f"{where}: not UTF-8 text (byte {raw[error.start]:#04x} at column "
                                   f"{error.start + 1}); save the manifest as UTF-8") from None
            if not line.strip():
                continue
            try:
                # One level more than attributes may take: the item's own object.
                record = parse_json_field(line, "line", MAX_MANIFEST_LINE_BYTES, MAX_JSON_DEPTH + 1)
            except FieldError as error:
                reason = str(error).removeprefix("line: ")
                if "nested" in reason:
                    reason = f"JSON nested more than {MAX_JSON_DEPTH} levels deep inside the item"
                raise CatalogError(f"{where}: {reason}") from None
            if not isinstance(record, dict):
                raise CatalogError(f"{where}: each line must be a JSON object")
            for key in ("id", "image"):
                if not isinstance(record.get(key), str) or not record[key].strip():
                    raise CatalogError(f"{where}: '{key}' is required and must be a non-empty string")
            item_id = record["id"]
            problem = check_item_id(item_id)
            if problem:
                raise CatalogError(f"{where}: {problem}")
            if item_id in first_line_of:
                raise CatalogError(
                    f"{where}: duplicate id {item_id!r} (first defined on line {first_line_of[item_id]})"
                )
            first_line_of[item_id] = line_number
            attributes = record.get("attributes") or {}
            if not isinstance(attributes, dict):
                raise CatalogError(f"{where}: 'attributes' must be a JSON object")
            image = Path(record["image"])
            item = CatalogItem(
                id=item_id,
                image=image if image.is_absolute() else base / image,
                category=_normalise_category(str(record.get("category") or "")),
                title=str(record.get("title") or ""),
                attributes=attributes,
            )
            problem = item_problem(item)
            if problem:
                raise CatalogError(f"{where}: {problem}")
            items.append(item)
    if not items:
        raise CatalogError(f"{path}: manifest has no items")
    return items


def _manifest_lines(handle) -> Iterable[bytes | None]:
    """The manifest's lines as bytes; None for one over ``MAX_MANIFEST_LINE_BYTES`` (never read whole)."""
    while True:
        line = handle.readline(MAX_MANIFEST_LINE_BYTES + 1)
        if not line:
            return
        yield None if len(line) > MAX_MANIFEST_LINE_BYTES else line


def load_catalog(source: str | Path) -> list[CatalogItem]:
    """A folder tree or a ``.jsonl`` manifest, whichever ``source`` is."""
    source = Path(source)
    if source.is_dir():
        return read_folder_tree(source)
    if source.suffix.lower() in {".jsonl", ".ndjson", ".json"}:
        return read_manifest(source)
    if not source.exists():
        raise CatalogError(f"{source}: no such folder or manifest")
    raise CatalogError(f"{source}: a catalog is a folder of images or a .jsonl manifest")


def write_manifest(items: Iterable[CatalogItem], path: str | Path) -> Path:
    """Write ``items`` as a JSONL manifest that ``read_manifest`` reads back to the same files.

    Images below the manifest's folder are written relative to it (the folder can move as a
    whole); others as absolute paths. Relative paths given in ``items`` are taken from the
    current directory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.absolute()
    with path.open("w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item.to_json(relative_to=base), ensure_ascii=False) + "\n")
    return path
