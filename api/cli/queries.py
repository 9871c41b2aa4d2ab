"""``catalens search``, ``locate``, ``classify`` and ``anomaly``: questions asked of an index with photos.

Answers are printed as they come, a few photos at a time (``answered``), so a long ``--from-file``
list streams its JSON lines and shows a progress bar on stderr. The exit status is 1 when no
photo could be answered.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from catalens.api.cli.arguments import (
    UsageError,
    add_command,
    add_config_argument,
    add_location_arguments,
    add_query_arguments,
    answered,
    exit_status,
    open_service,
    output_format,
    print_results,
    read_queries,
)
from catalens.api.tables import format_table, search_lines


def _search_table(mode: str):
    return lambda result: search_lines(result, mode)


SEARCH_CSV = ("query", "rank", "id", "score", "confidence", "match", "category", "title")


def _search_csv(result) -> Iterator[tuple]:
    for rank, hit in enumerate(result.results, 1):
        yield (result.query, rank, hit.id, f"{hit.score:.6f}", "" if hit.confidence is None else f"{hit.confidence:.4f}",
               "yes" if rank == 1 and result.match else "", hit.category, hit.title)


def _classify_table(result) -> Iterator[str]:
    guess = result.guess
    sure = result.sure_depth
    if not result.levels:
        yield f"\n{result.query}: {result.category}"
    elif sure == len(result.levels):
        yield f"\n{result.query}: {guess} (sure at every level)"
    elif sure:
        yield f"\n{result.query}: best guess {guess}, sure down to {result.category}"
    else:
        yield f"\n{result.query}: best guess {guess}, not sure at any level (category: unknown)"
    rows = [(depth, level.name, f"{level.confidence:.2f}",
             "yes" if depth <= sure else f"no (< {result.sure_at:.2f})")
            for depth, level in enumerate(result.levels, 1)]
    if rows:
        yield format_table(["level", "best guess", "confidence", "sure"], rows)
    yield "nearest items: " + ", ".join(result.neighbours)


CLASSIFY_CSV = ("query", "category", "guess", "confidences", "nearest")


def _classify_csv(result) -> Iterator[tuple]:
    yield (result.query, result.category, result.guess, " / ".join(f"{level.confidence:.4f}" for level in result.levels),
           " ".join(result.neighbours))


def _anomaly_line(result) -> Iterator[str]:
    verdict = "ANOMALOUS" if result.anomalous else "normal"
    extra = f"  heatmap {result.heatmap}" if result.heatmap else ""
    yield f"{result.query}: {verdict} (score {result.score:.4f}, threshold {result.threshold:.4f}){extra}"


def _audit_verdict(entry) -> str:
    if entry.outlier:
        return "OUTLIER"
    return "high, not an outlier" if entry.anomalous else "normal"


def _audit_lines(shown, entries, threshold: float, percentile: float) -> Iterator[str]:
    """The ``shown`` items of an audit of ``entries``, each with where it stands in the catalog, and
    what the words mean: the threshold is a percentile of the catalog's own scores, so a clean
    catalog has items above it too."""
    from catalens.search.anomaly import FAR_OUT_IQRS

    rows = [(rank, f"{e.score:.4f}", f"{e.percentile:.0f}", _audit_verdict(e), e.category, e.id)
            for rank, e in enumerate(shown, 1)]
    yield format_table(["#", "score", "percentile", "verdict", "category", "id"], rows) if rows else "no items scored"
    above = sum(e.anomalous for e in entries)
    yield (f"\nthreshold {threshold:.4f}: percentile {percentile:g} of the catalog's own photos' scores, so about {(100 - percentile) / 100:.0%} of ordinary photos score above it; "
           f"here {above} of {len(entries)} items do.")
    yield ("normal: below the threshold. high, not an outlier: above it, but within the spread of the catalog's "
           "own scores, as ordinary photos at the edge of the catalog are. OUTLIER: above it and more than "
           f"{FAR_OUT_IQRS:g} interquartile ranges above the catalog's upper quartile: look at these first.")
    yield ("percentile: the share of the catalog scoring at or below the item. 'catalens audit' weighs more "
           "evidence: misfiled items, duplicates, photos that are not a product.")


ANOMALY_CSV = ("query", "score", "threshold", "anomalous", "heatmap")


def _anomaly_csv(result) -> Iterator[tuple]:
    yield (result.query, f"{result.score:.6f}", f"{result.threshold:.6f}", "yes" if result.anomalous else "no",
           result.heatmap or "")


def cmd_search(args: argparse.Namespace) -> int:
    text = args.text.strip() if args.text and args.text.strip() else None
    queries = read_queries(args) if text is None or args.images or args.from_file else []
    fmt = output_format(args)
    if args.k is not None and args.k < 1:
        raise UsageError("--k must be at least 1")
    if text is not None and queries and args.mode not in (None, "fused"):
        raise UsageError(f"--text with a photo is fused search, not --mode {args.mode}")
    service = open_service(args)
    try:
        mode = args.mode or service.settings.mode or "fused"
        # Asked before the first photo is read: a mode or category the index lacks is one line.
        if queries:
            service.engine.check_mode(args.mode)
        category = service.check_category(args.category)
        if not queries:  # the words alone
            results = service.search([], category=category, k=args.k, text=text)

            def words(result) -> list[str]:
                if not args.explain:
                    return []
                from catalens.search.text import matched_words

                matched = matched_words(service.catalog, text, [hit.key for hit in result.results])
                return [f"{hit.id}: {', '.join(matched.get(hit.key, [])) or '-'}" for hit in result.results]

            print_results(results, fmt, _search_table("text"), words, SEARCH_CSV, _search_csv)
            return 0

        def explain(result) -> list[str]:
            if not args.explain or result.error:
                return []
            drawn = service.explain(result, Path(args.explain))
            return [f"explanations of {result.query}: {len(drawn)} image(s) in {args.explain}"]

        results = answered(queries, lambda chunk, first: service.search(
            chunk, category=category, k=args.k, mode=args.mode, collapse=args.collapse or None, text=text),
            "searching")
        failed = print_results(results, fmt, _search_table(mode), explain, SEARCH_CSV, _search_csv)
    finally:
        service.close()
    return exit_status(failed, len(queries))


def _locate_table(result) -> Iterator[str]:
    yield f"\n{result.query}"
    rows = [(rank, d.id, f"{d.score:.3f}", "-" if d.confidence is None else f"{d.confidence:.2f}", d.category, d.title,
             ",".join(map(str, d.box))) for rank, d in enumerate(result.detections, 1)]
    yield format_table(["#", "id", "score", "confidence", "category", "title", "box"], rows) if rows else "no products found"


LOCATE_CSV = ("query", "rank", "id", "score", "confidence", "category", "title", "x0", "y0", "x1", "y1")


def _locate_csv(result) -> Iterator[tuple]:
    for rank, d in enumerate(result.detections, 1):
        yield (result.query, rank, d.id, f"{d.score:.6f}", "" if d.confidence is None else f"{d.confidence:.4f}",
               d.category, d.title, *d.box)


def cmd_locate(args: argparse.Namespace) -> int:
    queries = read_queries(args)
    fmt = output_format(args)
    if args.max < 1:
        raise UsageError("--max must be at least 1")
    service = open_service(args)
    try:
        def draw(result) -> list[str]:
            if not args.draw or result.error:
                return []
            from catalens.search.locate import write_drawing

            return [f"boxes of {result.query}: {write_drawing(result, Path(args.draw))}"]

        results = answered(queries, lambda chunk, first: service.locate(chunk, max_detections=args.max), "locating")
        failed = print_results(results, fmt, _locate_table, draw, LOCATE_CSV, _locate_csv)
    finally:
        service.close()
    return exit_status(failed, len(queries))


def cmd_classify(args: argparse.Namespace) -> int:
    queries = read_queries(args)
    fmt = output_format(args)
    service = open_service(args)
    try:
        failed = print_results(answered(queries, lambda chunk, first: service.classify(chunk), "classifying"),
                               fmt, _classify_table, None, CLASSIFY_CSV, _classify_csv)
    finally:
        service.close()
    return exit_status(failed, len(queries))


def cmd_anomaly(args: argparse.Namespace) -> int:
    if args.audit and (args.images or args.from_file):
        raise UsageError("--audit scores the catalog's own items; give no query images with it")
    queries = [] if args.audit else read_queries(args)
    fmt = output_format(args)
    args.json = fmt == "json"
    service = open_service(args)
    try:
        if args.audit:
            # All of them: where the top items stand needs the whole catalog's scores.
            entries = service.audit(progress=not args.json)
            shown = entries[: args.top] if args.top else entries
            if args.json:
                for entry in shown:
                    print(json.dumps({"id": entry.id, "image": entry.image, "category": entry.category,
                                      "score": round(entry.score, 6), "anomalous": entry.anomalous,
                                      "percentile": round(entry.percentile, 2), "outlier": entry.outlier},
                                     ensure_ascii=False))
            else:
                print("\n".join(_audit_lines(shown, entries, *service.anomaly_threshold())))
            return 0
        results = answered(queries, lambda chunk, first: service.anomaly(chunk, heatmaps=args.heatmaps, first=first),
                           "scoring")
        failed = print_results(results, fmt, _anomaly_line, None, ANOMALY_CSV, _anomaly_csv)
        if args.heatmaps and fmt != "table" and failed < len(queries):
            print(f"heatmaps in {args.heatmaps}", file=sys.stderr)
        return exit_status(failed, len(queries))
    finally:
        service.close()


MODES_HELP = ("fused (every weighted feature in one ranking), local (visual words and geometric verification: "
              "logos), or a global feature of the index: deep, colour, ae, style... (catalens info lists them)")


def register(commands) -> None:
    p = add_command(
        commands, "search", "find catalog items matching photos",
        description="Find the catalog items that best match each photo, best first. Exit status 1 when no photo "
                    "could be read.",
        epilog="examples: catalens search shelf.jpg --index shop-index --k 5\n"
               "          catalens search --text 'oatly havre' --index shop-index\n"
               "          catalens search --from-file photos.txt --index shop-index --json > hits.jsonl")
    add_query_arguments(p)
    add_location_arguments(p)
    p.add_argument("-k", "--k", type=int, default=None,
                   help="results per photo (default: [search] k of --config, or $CATALENS_SEARCH_K, else 10)")
    p.add_argument("--text", metavar="WORDS",
                   help="search by words (ids, titles, categories, attributes, words read on the items' images; "
                        "typos allowed): alone, or with photos as one more evidence of fused search")
    p.add_argument("--mode", default=None, help=f"how to rank (default fused): {MODES_HELP}")
    p.add_argument("--category", metavar="PATH",
                   help="only items under this category path prefix of whole levels (Packages or Packages/Milk)")
    p.add_argument("--collapse", action="store_true",
                   help="one result per product (the item's 'product' attribute, else its category)")
    p.add_argument("--explain", metavar="OUT",
                   help="folder for images of the keypoints each result shares with the photo (modes fused, local); "
                        "with --text alone, the words each result matched are printed")
    add_config_argument(p, "table [search]")
    p.set_defaults(run=cmd_search)

    p = add_command(
        commands, "locate", "find each catalog product a photo shows, with its box",
        description="Find the catalog products in each photo (a shelf, a basket, a flyer page), each instance with "
                    "its box in the photo's pixels, best first. Printed labels are found by verified keypoint "
                    "matches, fruit and vegetables by scored windows. Exit status 1 when no photo could be read.",
        epilog="examples: catalens locate basket.jpg --index shop-index --draw boxes/\n"
               "          catalens locate --from-file photos.txt --index shop-index --json > found.jsonl")
    add_query_arguments(p)
    add_location_arguments(p)
    p.add_argument("--max", type=int, default=20, help="the best this many detections per photo")
    p.add_argument("--draw", metavar="OUT",
                   help="folder for each photo drawn with its labelled boxes (PNG, named after the photo)")
    add_config_argument(p, "table [search]")
    p.set_defaults(run=cmd_locate)

    p = add_command(
        commands, "classify", "propose a category path for item photos",
        description="Propose a category path for each photo, level by level with a confidence, fitted on the "
                    "indexed items. Exit status 1 when no photo could be read.",
        epilog="example: catalens classify new-item.jpg --index shop-index")
    add_query_arguments(p)
    add_location_arguments(p)
    add_config_argument(p, "table [search]")
    p.set_defaults(run=cmd_classify)

    p = add_command(
        commands, "anomaly", "score photos by autoencoder reconstruction error, or audit the catalog",
        description="Score photos by how badly the index's autoencoder (catalens train-ae) reconstructs them: "
                    "above the threshold is anomalous. --audit lists the catalog's own most anomalous items ('catalens audit' is the fuller check: misfiled items, duplicates, non-products).",
        epilog="examples: catalens anomaly upload.jpg --index shop-index --heatmaps heatmaps/\n"
               "          catalens anomaly --audit --index shop-index --top 50")
    add_query_arguments(p)
    add_location_arguments(p)
    p.add_argument("--heatmaps", metavar="OUT", help="folder for heatmaps of where reconstruction failed")
    p.add_argument("--audit", action="store_true", help="list the catalog's own most anomalous items instead")
    p.add_argument("--top", type=int, default=20, help="with --audit: how many items to list")
    add_config_argument(p, "table [search]")
    p.set_defaults(run=cmd_anomaly)
