"""What is refused before a request's body is read: a write without the key, and a body over the
upload limit, whatever its transfer encoding; and the headers every response carries.

A ``Content-Length`` over the limit is refused at once. A chunked body (no length) is counted as
it arrives and reading stops at the limit: the app's answer to the cut-off body is replaced by a
413, so no more than the limit is ever read or spooled to disk. Writes check the key first, so an
unauthorised client cannot make the server read a large body.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
KEY_HEADER = "x-api-key"
# Multipart boundaries and the form's other fields, beside the photo itself.
FORM_OVERHEAD_BYTES = 1024 * 1024
MIN_KEY_CHARS = 16


def api_key_problem(key: str | None) -> str | None:
    """Why ``key`` cannot guard writes, or None: it needs ``MIN_KEY_CHARS`` characters that are not blank."""
    if not key or len("".join(key.split())) < MIN_KEY_CHARS:
        return (f"the API key must have at least {MIN_KEY_CHARS} characters that are not blank "
                "(e.g. $(openssl rand -hex 16))")
    return None


class _BodyTooLarge(Exception):
    pass


def key_matches(given: str | None, expected: str | None) -> bool:
    return bool(given) and bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def write_refusal(read_only: bool, expected_key: str | None, given_key: str | None) -> tuple[int, str] | None:
    """(status, detail) refusing a write, or None: one rule for the guard and the route dependency."""
    if read_only:
        return 403, "this server is read-only"
    if not key_matches(given_key, expected_key):
        return 401, "missing or wrong API key (send it in the X-API-Key header)"
    return None


class RequestGuard:
    """ASGI middleware: write permission from the headers, then the body counted against ``max_body_bytes``."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, read_only: bool, api_key: str | None,
                 write_prefixes: tuple[str, ...] = ("/items",)):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.read_only, self.api_key, self.write_prefixes = read_only, api_key, write_prefixes

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        headers = Headers(scope=scope)
        if scope["method"] in WRITE_METHODS and scope["path"].startswith(self.write_prefixes):
            refusal = write_refusal(self.read_only, self.api_key, headers.get(KEY_HEADER))
            if refusal is not None:
                return refusal
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body_bytes:
            return 413, self._too_large()
        return None

    def _too_large(self) -> str:
        return f"request larger than the {self.max_body_bytes - FORM_OVERHEAD_BYTES} byte upload limit"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            # Answered without reading the body; the server closes the connection after it.
            await JSONResponse({"detail": refusal[1]}, status_code=refusal[0])(scope, receive, send)
            return
        received, exceeded, started = 0, False, False

        async def counted_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's answer to a body cut off at the limit
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await JSONResponse({"detail": self._too_large()}, status_code=413)(scope, receive, send)


# Browsers must not guess a type (an uploaded image served as HTML), frame the page (clickjacking) or
# send the page's URL to other sites. No Content-Security-Policy: /docs runs Swagger UI's inline script.
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
)


class SecurityHeaders:
    """ASGI middleware: ``SECURITY_HEADERS`` on every HTTP response (the page, images, errors)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name, value) for name, value in SECURITY_HEADERS if name not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)
