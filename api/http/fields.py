"""What routes share: reading a category path from a form field, and naming an item's image URL."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import HTTPException

from catalens.api.http.problems import problem
from catalens.api.http.state import ServerState
from catalens.datasets.catalog import MAX_CATEGORY_CHARS, check_category_path
from catalens.errors import CatalensError


def image_url(item_id: str) -> str:
    return f"/items/{quote(item_id, safe='')}/image"


def clean_category(category: str | None) -> str | None:
    """The category path a form field gives ('\\' read as '/', levels trimmed), None for a blank field;
    a 422 for a path with no level ('/'), over the caps, or with a refused character."""
    if not category or not category.strip():
        return None
    if len(category) > MAX_CATEGORY_CHARS:  # refused before it is split into levels
        raise HTTPException(422, f"category has {len(category)} characters; a category path has at most "
                                 f"{MAX_CATEGORY_CHARS}")
    cleaned = "/".join(part.strip() for part in category.replace("\\", "/").split("/") if part.strip())
    refusal = check_category_path(cleaned) if cleaned else f"category {category!r} names no category level"
    if refusal:
        raise HTTPException(422, refusal)
    return cleaned


async def checked_category(state: ServerState, category: str | None) -> str | None:
    """The cleaned category filter, if the index has that category; a 422 naming close ones if not."""
    try:
        return await state.run(state.service.check_category, clean_category(category))
    except CatalensError as error:  # an unknown category (UnknownCategoryError), a refused path (FieldError)
        raise problem(error) from None
