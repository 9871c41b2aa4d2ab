"""The ``catalens`` command line. It parses and prints; ``catalens.api.service`` does the work.

Each module of this package registers its sub-commands: ``catalog`` (index, info, remove,
demo), ``queries`` (search, classify, anomaly), ``training`` (train-ae, finetune), ``serve``;
``arguments`` is what they share.
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import sys
from collections.abc import Sequence

from catalens.api.cli.arguments import HelpFormatter, error_cause
from catalens.errors import CatalensError, InputError, UnavailableError


def build_parser() -> argparse.ArgumentParser:
    from catalens.api.cli import audit, catalog, queries, serve, training

    parser = argparse.ArgumentParser(
        prog="catalens", formatter_class=HelpFormatter,
        description="Visual search for product catalogs: index a catalog, then search it by photo, file new items "
                    "into its categories and flag photos that do not belong.",
        epilog="start with: catalens demo; then catalens index CATALOG --index DIR. "
               "'catalens COMMAND --help' explains each command.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details on stderr")
    parser.add_argument("--version", action="version", version=f"catalens {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help="what to do ('catalens COMMAND --help' for its options)")
    for module in (catalog, queries, audit, training, serve):
        module.register(commands)
    return parser


def _version() -> str:
    import catalens

    return catalens.__version__


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments; an option the command does not know is an error with that command's usage,
    not the top-level one."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


# What the library's errors exit with, by kind (``catalens.errors``): each is printed as one line.
EXIT_CODES: dict[type[CatalensError], int] = {InputError: 2, UnavailableError: 2, CatalensError: 2}


def exit_code(error: CatalensError) -> int:
    return next(EXIT_CODES[kind] for kind in type(error).__mro__ if kind in EXIT_CODES)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    console = logging.StreamHandler()
    # The handler's level, not the root's: indexing runs raise the root to INFO for their log file.
    console.setLevel(logging.INFO if args.verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(console)
    logging.getLogger().setLevel(logging.INFO if args.verbose else logging.WARNING)
    # The client logs every retry of an unreachable cluster with its traceback; the one line below says it.
    logging.getLogger("elastic_transport").setLevel(logging.INFO if args.verbose else logging.CRITICAL)
    try:
        return args.run(args)
    except CatalensError as error:  # the user's to fix: one line, no traceback
        print(f"catalens {args.command}: {error}", file=sys.stderr)
        return exit_code(error)
    except BrokenPipeError:  # the reader went away (| head): what it read is the answer
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as error:
        from catalens.indexer.files import disk_full

        if _from_elasticsearch(error):
            print(f"catalens {args.command}: Elasticsearch at {_es_url(args)} cannot be reached or refused the "
                  f"request ({error_cause(error)}); is it running? (docker compose up -d)", file=sys.stderr)
            return 2

        where = getattr(args, "index", None) or "DIR"
        if disk_full(error):
            print(f"catalens {args.command}: the disk is full ({error_cause(error)}); free some space and run the same "
                  "command again: what was committed before stays in the index", file=sys.stderr)
            return 2
        if not isinstance(error, sqlite3.DatabaseError):
            raise
        # Damage the header check at open cannot see (a page in the middle of items.sqlite).
        print(f"catalens {args.command}: {where}/items.sqlite is damaged ({error}); run 'catalens check --index "
              f"{where}'", file=sys.stderr)
        return 2


def _from_elasticsearch(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is the Elasticsearch client's: a connection refused, a
    timeout, an error answer."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error).__module__.split(".")[0] in ("elastic_transport", "elasticsearch"):
            return True
        error = error.__cause__ or error.__context__
    return False


def _es_url(args: argparse.Namespace) -> str:
    import os

    from catalens.api.cli.arguments import ES_URL_ENV

    return getattr(args, "es_url", None) or os.environ.get(ES_URL_ENV) or "the given URL"


if __name__ == "__main__":
    sys.exit(main())
