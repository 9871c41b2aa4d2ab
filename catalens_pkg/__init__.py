"""catalens: visual search for product catalogs.

For scripts and notebooks, open an index and ask it about photos::

    import catalens

    shop = catalens.open("shop-index")          # a folder, or "http://localhost:9200" (Elasticsearch)
    answer = shop.search("shelf.jpg", k=5)
    print(answer.match, [(hit.id, hit.confidence) for hit in answer.results])

``catalens.open`` returns an :class:`~catalens.index.Index`; the command line and the HTTP API
answer through the same service (``catalens.api.service``). Importing ``catalens`` loads nothing
heavy: the index's modules load on the first ``open``.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any

try:
    __version__ = metadata.version("catalens")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from catalens.index import Index, PhotoError, open

__all__ = ["Index", "PhotoError", "__version__", "open"]


def __getattr__(name: str) -> Any:
    if name in ("Index", "PhotoError", "open"):
        from catalens import index

        return getattr(index, name)
    raise AttributeError(f"module 'catalens' has no attribute {name!r}")
