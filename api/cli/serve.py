"""``catalens serve``: the HTTP API and web page over one index."""

from __future__ import annotations

import argparse
import os

from catalens.api.cli.arguments import UsageError, add_location_arguments, location


def cmd_serve(args: argparse.Namespace) -> int:
    from catalens.api.http.app import API_KEY_ENV, create_app

    if not args.read_only and not os.environ.get(API_KEY_ENV):
        raise UsageError(f"writes (POST/DELETE /items) need an API key: set {API_KEY_ENV}, or pass --read-only")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        # Not refused: a deployment behind a proxy binds wider on purpose. Said once, plainly.
        print(f"catalens serve: listening on {args.host}, reachable from other machines")

    import uvicorn

    app = create_app(location(args), read_only=args.read_only)
    print(f"catalens serve: http://{args.host}:{args.port}/ (API docs at /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


def register(commands) -> None:
    p = commands.add_parser("serve", help="serve the HTTP API and web page over an index")
    add_location_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--read-only", action="store_true", help="no writes: POST/DELETE /items answer 403")
    p.set_defaults(run=cmd_serve)
