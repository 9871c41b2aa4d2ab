"""What the command line's sub-commands share: how a command is declared and helped, where the
index is, its service, the query photos and how their answers are printed."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from catalens.errors import InputError

ES_URL_ENV = "CATALENS_ES_URL"
BACKENDS = ("folder", "es")


class UsageError(InputError):
    """A command line that cannot be carried out; printed as one line, exit code 2."""


def error_cause(error: BaseException) -> str:
    """The last line of what the library said (faiss's messages start with a C++ location)."""
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except where there is nothing to show (a switch, no
    default); descriptions keep their line breaks, and example lines are kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(
            indent + line if line.startswith(("example", " ")) or not line.strip()
            else textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
            for line in text.splitlines())

    def _get_help_string(self, action: argparse.Action) -> str:
        if any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)) or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def add_command(commands, name: str, help: str, description: str | None = None,
                epilog: str | None = None) -> argparse.ArgumentParser:
    """A sub-command whose ``--help`` shows its purpose, every option's default, and examples."""
    return commands.add_parser(name, help=help, description=description or help[:1].upper() + help[1:] + ".",
                               epilog=epilog, formatter_class=HelpFormatter)


def add_location_arguments(parser: argparse.ArgumentParser, creates: bool = False) -> None:
    """``--index DIR`` and the Elasticsearch alternative, ``--backend es`` / ``--es-url URL``."""
    parser.add_argument("--index", metavar="DIR",
                        help="the index folder" + (" (created if absent)" if creates else "")
                        + "; not needed with --backend es")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help=f"where items and vectors live (when not given: es if --es-url or ${ES_URL_ENV} is set, "
                             "else folder)")
    parser.add_argument("--es-url", metavar="URL", default=None,
                        help=f"Elasticsearch URL (or ${ES_URL_ENV}); the index name is $CATALENS_ES_INDEX, "
                             "default catalens")


def add_config_argument(parser: argparse.ArgumentParser, tables: str) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help=f"TOML configuration file (or $CATALENS_CONFIG): its {tables}; "
                             "CATALENS_* variables override it")


def location(args: argparse.Namespace) -> str:
    """The index location the arguments name: a folder, or ``es+URL/INDEX``."""
    from catalens.indexer.stores.elastic.catalog import elastic_location

    es_url = getattr(args, "es_url", None) or os.environ.get(ES_URL_ENV)
    backend = getattr(args, "backend", None) or ("es" if es_url else "folder")
    if backend == "es":
        if not es_url:
            raise UsageError(f"--backend es needs --es-url URL or {ES_URL_ENV}")
        return elastic_location(es_url)
    if not args.index:
        raise UsageError("--index DIR is required (or --backend es with --es-url URL)")
    return args.index


def open_service(args: argparse.Namespace):
    """The service over the catalog the arguments name (``UsageError`` when it cannot be opened)."""
    from catalens.api.service import CatalogService
    from catalens.indexer.catalog import IndexUnavailableError
    from catalens.search.settings import load_search_settings

    settings = load_search_settings(getattr(args, "config", None))
    try:
        return CatalogService.open(location(args), settings)
    except IndexUnavailableError as error:
        raise UsageError(str(error)) from None


def read_queries(args: argparse.Namespace) -> list[str]:
    """The query photos: each PHOTO (a folder stands for the photos below it, sorted), then the
    lines of ``--from-file``."""
    from catalens.datasets import read_photo_list

    queries = []
    for photo in args.images:
        if Path(photo).is_dir():
            queries.extend(str(path) for path in read_photo_list(photo))
        else:
            queries.append(photo)
    if args.from_file:
        path = Path(args.from_file)
        if not path.is_file():
            raise UsageError(f"--from-file {path}: no such file")
        queries.extend(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not queries:
        raise UsageError("give at least one query image (or --from-file LIST)")
    return queries


FORMATS = ("table", "json", "csv")


def add_query_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", metavar="PHOTO",
                        help="query photos (JPEG, PNG, WebP, ...); a folder means every photo below it")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="table (for a person, the default), json (one object per photo per line) or csv "
                             "(one row per result, with a header), on stdout as each photo is answered")
    parser.add_argument("--json", action="store_true", help="the same as --format json")
    parser.add_argument("--from-file", metavar="LIST",
                        help="a file with one query photo path per line (after any PHOTO); a progress bar "
                             "on stderr when it is a terminal")


def output_format(args: argparse.Namespace) -> str:
    """``table``, ``json`` or ``csv``: ``--format``, with ``--json`` as its short form."""
    chosen = getattr(args, "format", None)
    if getattr(args, "json", False):
        if chosen not in (None, "json"):
            raise UsageError(f"--json and --format {chosen} ask for two formats; give one")
        return "json"
    return chosen or "table"


def error_reason(query: str, error: str) -> str:
    """``error`` without the path it starts with (decoding errors name their file), so that a line
    or row that already names the photo says it once."""
    for prefix in (f"{query}: ", f"{query} "):
        if error.startswith(prefix):
            return error[len(prefix):]
    return error


def print_results(results: Iterable, fmt: str | bool, render: Callable[[Any], Iterable[str]],
                  on_each: Callable[[Any], Iterable[str]] | None = None,
                  csv_header: Sequence[str] = (), csv_rows: Callable[[Any], Iterable[Sequence[Any]]] | None = None) -> int:
    """Each query's result, as it comes: a JSON line, CSV rows (``csv_rows``, under ``csv_header``
    and an ``error`` column), an error line, or ``render``'s lines; ``on_each`` adds lines for a
    person (on stderr with json or csv). Returns how many failed."""
    import csv

    fmt = "json" if fmt is True else "table" if fmt is False else fmt
    writer = csv.writer(sys.stdout, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow([*csv_header, "error"])
    failed = 0
    for result in results:
        failed += result.error is not None
        lines: list[str] = []
        if fmt == "json":
            lines = [json.dumps(result.to_json(), ensure_ascii=False)]
        elif writer is not None:
            if result.error:
                writer.writerow([result.query, *[""] * (len(csv_header) - 1), error_reason(result.query, result.error)])
            else:
                for row in csv_rows(result):
                    writer.writerow([*row, ""])
        elif result.error:
            lines = [f"{result.query}: error: {error_reason(result.query, result.error)}"]
        else:
            lines = list(render(result))
        for line in lines:
            tqdm.write(line, file=sys.stdout)
        for line in on_each(result) if on_each else ():
            tqdm.write(line, file=sys.stdout if fmt == "table" else sys.stderr)
        sys.stdout.flush()
    return failed


def answered(queries: Sequence[str], ask: Callable[[Sequence[str], int], list], what: str) -> Iterable:
    """``ask(chunk, first)``'s results over ``queries``, a few photos at a time, each as soon as it
    is answered; a progress bar on stderr when it is a terminal and there are several photos."""
    from catalens.api.service import in_chunks

    with tqdm(total=len(queries), unit="photo", desc=what, file=sys.stderr, leave=False, dynamic_ncols=True,
              disable=None if len(queries) > 1 else True) as bar:
        for result in in_chunks(queries, ask):
            yield result
            bar.update(1)


def exit_status(failed: int, total: int) -> int:
    """1 when no photo could be answered (a missing file, say), else 0: failures of some are in the output."""
    return 1 if total and failed == total else 0

