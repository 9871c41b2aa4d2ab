"""Search by photo: each query image to the best-matching catalog items, in one of several modes.

A mode is a retriever registered by name (``deep`` here; ``local``, ``fused`` and ``ae`` come
from their own modules); the engine decodes queries, applies the category filter and turns
item keys into results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from indexer.imageio import ImageSource, decode_queries
from indexer.index import CatalogIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchHit:
    id: str
    score: float
    category: str
    title: str
    key: int = field(default=-1, repr=False)
    details: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "score": round(float(self.score), 6), "category": self.category, "title": self.title}


@dataclass
class QueryResult:
    query: str
    results: list[SearchHit] | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"query": self.query, "error": self.error}
        return {"query": self.query, "results": [hit.to_json() for hit in self.results or []]}


@dataclass
class Query:
    """A decoded query image and what retrievers computed from it (shared between modes)."""

    image: Image.Image
    name: str
    cache: dict[str, Any] = field(default_factory=dict)


# A retriever returns (keys, scores) best first, at most k, restricted to allowed keys if given.
Retriever = Callable[["SearchEngine", Query, int, np.ndarray | None], tuple[np.ndarray, np.ndarray]]
_MODES: dict[str, Retriever] = {}


def register_mode(name: str) -> Callable[[Retriever], Retriever]:
    def decorate(retriever: Retriever) -> Retriever:
        _MODES[name] = retriever
        return retriever

    return decorate


def available_modes() -> list[str]:
    _load_mode_modules()
    return sorted(_MODES)


def default_mode() -> str:
    return "fused" if "fused" in available_modes() else "deep"


def _load_mode_modules() -> None:
    # Importing these registers their modes; they are optional so the spine works without them.
    for module in ("search.local", "search.fusion", "search.ae_mode"):
        try:
            __import__(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise


class SearchEngine:
    """Answers queries against one open index."""

    def __init__(self, index: CatalogIndex):
        self.index = index

    @property
    def deep(self):
        return self.index.deep_extractor()

    def deep_vector(self, query: Query) -> np.ndarray:
        if "deep" not in query.cache:
            query.cache["deep"] = self.deep.transform_images([query.image])[0]
        return query.cache["deep"]

    def search(
        self,
        sources: Sequence[ImageSource | Image.Image],
        k: int = 10,
        mode: str | None = None,
        category: str | None = None,
        names: Sequence[str] | None = None,
    ) -> list[QueryResult]:
        mode = mode or default_mode()
        if mode not in available_modes():
            raise ValueError(f"unknown mode {mode!r}; available: {', '.join(available_modes())}")
        if k < 1:
            raise ValueError("k must be at least 1")
        allowed = None
        if category:
            allowed = self.index.store.keys_in_category(category)
        results = []
        for name, image, error in decode_queries(sources, names, self.index.config.max_pixels):
            if error is not None:
                results.append(QueryResult(query=name, error=error))
                continue
            if allowed is not None and len(allowed) == 0:
                results.append(QueryResult(query=name, results=[]))
                continue
            keys, scores = _MODES[mode](self, Query(image, name), k, allowed)
            results.append(QueryResult(query=name, results=self.hits(keys, scores)))
        return results

    def hits(self, keys: np.ndarray, scores: np.ndarray, details: Sequence[dict] | None = None) -> list[SearchHit]:
        records = self.index.store.items(int(key) for key in keys if key >= 0)
        hits = []
        for position, (key, score) in enumerate(zip(keys, scores, strict=True)):
            record = records.get(int(key))
            if record is None:
                continue
            extra = details[position] if details else {}
            hits.append(SearchHit(record.id, float(score), record.category, record.title, int(key), extra))
        return hits


@register_mode("deep")
def deep_retriever(engine: SearchEngine, query: Query, k: int, allowed: np.ndarray | None):
    """Cosine nearest neighbours of the query's deep descriptor (through the finetuned head if kept)."""
    from indexer.finetune import deep_search_space

    store, embed = deep_search_space(engine.index)
    scores, keys = store.search(embed(engine.deep_vector(query)[None]), k, allowed)
    valid = keys[0] >= 0
    return keys[0][valid], scores[0][valid]

