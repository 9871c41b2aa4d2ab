"""What an error tells an HTTP client: its detail, without the server's filesystem paths.

Library errors name files for the person at the terminal (``/srv/shop-index: no autoencoder
trained...``); a client gets the same sentence with the index called "this index" and any
other server path as ``<server path>``. The library's errors (``catalens.errors``) answer with
the status of their kind, from ``STATUSES``.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from fastapi import HTTPException

from catalens.errors import CatalensError, InputError, UnavailableError

# An absolute path of two or more parts (Windows drive paths too), stopped by quotes and spaces.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/\\-])(?:[A-Za-z]:)?[/\\](?:[^\s'\"/\\:,;()<>]+[/\\])+[^\s'\"/\\:,;()<>]*")


class PathScrubber:
    """Removes the index's location and every other server path from a message."""

    def __init__(self, index_locations: Iterable[str | Path], other_roots: Iterable[str | Path] = ()):
        given = [str(location) for location in index_locations if str(location)]
        # "LOCATION: what happened" is how errors name the index: the name goes, the sentence stays.
        self._prefixes = sorted({f"{location}: " for location in given}, key=len, reverse=True)
        # A bare relative name ("idx") is replaced only as such a prefix: elsewhere it may be a word.
        index = {location for location in given if "/" in location or "\\" in location}
        index |= {str(Path(location).resolve()) for location in given if "://" not in location}
        # Longest first, so that a folder inside another is replaced whole.
        self._index = sorted(index, key=len, reverse=True)
        roots = {str(root) for root in other_roots if str(root) and len(str(root)) > 1}
        self._roots = sorted(roots, key=len, reverse=True)

    @classmethod
    def for_location(cls, location: str | Path, *extra: str | Path) -> PathScrubber:
        roots = [Path.home(), Path.cwd(), tempfile.gettempdir(), sys.prefix, os.environ.get("CATALENS_WEIGHTS_DIR", "")]
        return cls([location, *extra], roots)

    def __call__(self, message: str) -> str:
        for prefix in self._prefixes:
            message = message.replace(prefix, "")
        for location in self._index:
            message = message.replace(f"{location}: ", "").replace(location, "this index")
        message = _ABSOLUTE_PATH.sub("<server path>", message)
        for root in self._roots:  # what the pattern leaves: a root of one part (/root, /srv)
            message = message.replace(root, "<server path>")
        return message


# What the library's errors answer with, by kind: the caller's to fix, or not answerable until a
# model, feature or index is there.
STATUSES: dict[type[CatalensError], int] = {InputError: 422, UnavailableError: 503, CatalensError: 500}


def status_of(error: CatalensError) -> int:
    return next(STATUSES[kind] for kind in type(error).__mro__ if kind in STATUSES)


def problem(error: CatalensError, context: str | None = None) -> HTTPException:
    """The HTTP error for ``error``: its kind's status, its message after ``context`` if given."""
    return HTTPException(status_of(error), f"{context}: {error}" if context else str(error))
