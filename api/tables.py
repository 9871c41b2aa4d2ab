"""Plain-text tables for the terminal, and how a search's answer reads in one (``search``, ``demo``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def verdict(result, mode: str) -> str:
    """The line above a photo's results: its match, or why there is none, with the numbers."""
    top = result.results[0] if result.results else None
    if result.match:
        return f"match {result.match} (confidence {top.confidence:.2f}, threshold {result.threshold:.2f})"
    if top is None:
        return "no results"
    if result.threshold is not None and result.threshold >= 1.0:
        return (f"no confident match: mode {mode} cannot judge its matches on this catalog (no threshold was right "
                "95% of the time on held-out photos); read the scores, or search in another mode")
    if top.confidence is None or result.threshold is None:
        return "no confident match"
    return f"no confident match (top confidence {top.confidence:.2f} < threshold {result.threshold:.2f})"


def search_lines(result, mode: str) -> Iterator[str]:
    """A photo's search results for a person: the verdict, then rank, id, score (the mode's ranking
    scale), confidence (the calibrated probability of the same product), category and title."""
    if not result.calibrated:
        yield f"\n{result.query}"
        rows = [(rank, hit.id, f"{hit.score:.3f}", hit.category, hit.title) for rank, hit in enumerate(result.results, 1)]
        yield format_table(["#", "id", "score", "category", "title"], rows) if rows else "no results"
        return
    yield f"\n{result.query}: {verdict(result, mode)}"
    rows = [(rank, hit.id, f"{hit.score:.3f}", "" if hit.confidence is None else f"{hit.confidence:.2f}",
             hit.category, hit.title) for rank, hit in enumerate(result.results, 1)]
    yield format_table(["#", "id", "score", "confidence", "category", "title"], rows) if rows else "no results"
