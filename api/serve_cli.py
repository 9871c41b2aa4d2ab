"""``catalens serve``: the HTTP API and web page over one index."""

from __future__ import annotations

import argparse
import os

from api.app import API_KEY_ENV


def cmd_serve(args: argparse.Namespace) -> int:
    from api.cli import UsageError

    if not args.read_only and not os.environ.get(API_KEY_ENV):
        raise UsageError(
            f"writes (POST/DELETE /items) need an API key: set {API_KEY_ENV}, or pass --read-only"
        )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        # Not refused: a deployment behind a proxy binds wider on purpose. Said once, plainly.
        print(f"catalens serve: listening on {args.host}, reachable from other machines")

    import uvicorn

    from api.app import create_app
    from indexer.index import IndexUnavailableError

    try:
        app = create_app(args.index, read_only=args.read_only)
    except IndexUnavailableError as error:
        raise UsageError(str(error)) from None
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the HTTP API and web page over an index")
    p.add_argument("--index", required=True, help="index folder (built by 'catalens index')")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--read-only", action="store_true", help="no writes: POST/DELETE /items answer 403")
    p.set_defaults(run=cmd_serve)
