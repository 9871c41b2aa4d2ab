"""``catalens serve``: the HTTP API and web page over one index."""

from __future__ import annotations

import argparse
import os

from catalens.api.cli.arguments import (
    UsageError,
    add_command,
    add_config_argument,
    add_location_arguments,
    location,
)


def cmd_serve(args: argparse.Namespace) -> int:
    from catalens.api.http.app import API_KEY_ENV, create_app
    from catalens.api.http.guard import api_key_problem

    if not args.read_only and not os.environ.get(API_KEY_ENV):
        raise UsageError(f"writes (POST/DELETE /items) need an API key: set {API_KEY_ENV}, or pass --read-only")
    if not args.read_only and api_key_problem(os.environ[API_KEY_ENV]):
        raise UsageError(f"{API_KEY_ENV}: {api_key_problem(os.environ[API_KEY_ENV])}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        # Not refused: a deployment behind a proxy binds wider on purpose. Said once, plainly.
        print(f"catalens serve: listening on {args.host}, reachable from other machines")

    import uvicorn

    from catalens.search.settings import load_search_settings

    # Read before the index is opened: a misspelt setting is one line, as in search.
    settings = load_search_settings(args.config)
    app = create_app(location(args), read_only=args.read_only, settings=settings)
    # Stale or missing fits are refitted on a background thread (create_app starts it): the server
    # answers at once, with the last fits meanwhile.
    state = app.state.catalens
    if not state.refit.idle():
        print("catalens serve: refitting the classifier and match calibration in the background "
              "(searches use the last fits meanwhile)", flush=True)
    writes = "read-only" if args.read_only else f"writes need the X-API-Key header (${API_KEY_ENV})"
    print(f"catalens serve: http://{args.host}:{args.port}/ (API docs at /docs; {writes})", flush=True)
    from catalens.api.http.connections import HeaderDeadlineProtocol

    # Idle keep-alive connections close after 5 s (uvicorn's default, stated here), and each request's
    # headers must arrive within HEADER_TIMEOUT_SECONDS: slow clients cannot hold connections forever.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                http=HeaderDeadlineProtocol, timeout_keep_alive=5)
    return 0


def register(commands) -> None:
    p = add_command(
        commands, "serve", "serve the HTTP API and the web page over an index",
        description="Serve the HTTP API (POST /search, /classify, /anomaly, /explain; GET /items/ID, /stats, "
                    "/health; POST and DELETE /items) and a web page at /; the API's documentation is at /docs "
                    "and /redoc, served offline. Writes need the key in $CATALENS_API_KEY, sent as the X-API-Key "
                    "header; --read-only serves without writes and needs no key.",
        epilog="examples: CATALENS_API_KEY=$(openssl rand -hex 16) catalens serve --index shop-index\n"
               "          catalens serve --index shop-index --read-only --port 8080")
    add_location_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port")
    p.add_argument("--read-only", action="store_true",
                   help="no writes: POST/DELETE /items answer 403, and no API key is needed")
    add_config_argument(p, "table [search] (k, mode, weights, ...: each request's defaults)")
    p.set_defaults(run=cmd_serve)
