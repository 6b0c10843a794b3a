"""ASGI middleware: request ids and the request body size limit."""

from __future__ import annotations

import json
import re
import uuid
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import error_body

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class RequestIdMiddleware:
    """Take X-Request-ID from the client (if sane) or make one; echo it and expose it to logs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID_RE.fullmatch(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


# The routes that take a JSONL file: they read their body as a stream, up to MAX_UPLOAD_BYTES.
UPLOAD_ROUTES = re.compile(r"/users/[^/]+/feedback/import|/v1/files")


class BodySizeLimitMiddleware:
    """Refuse bodies over `max_bytes` with 413, whether or not Content-Length is sent.

    A POST to an upload route may be up to `upload_max_bytes` and is passed on as it arrives,
    never held whole in memory.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, upload_max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_max_bytes = upload_max_bytes or max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["method"] == "POST" and UPLOAD_ROUTES.fullmatch(scope["path"])
        limit = self.upload_max_bytes if upload else self.max_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await self._reject(send, limit)
            return
        if upload:
            await self._stream(scope, receive, send)
            return
        # Read the body up front (it is bounded by the limit), then replay it to the app.
        # Raising from inside receive() would be turned into a generic 400 by the body parser.
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > self.max_bytes:
                await self._reject(send, self.max_bytes)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the body on chunk by chunk; past the limit, answer 413 and end the request.

        The app then reads a disconnect (a stream reader sees the client gone, its transaction
        rolls back) and whatever it would answer is dropped: the client got the 413.
        """
        received, rejected, started = 0, False, False

        async def counted() -> Message:
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.upload_max_bytes:
                    rejected = True
                    if not started:
                        await self._reject(send, self.upload_max_bytes)
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if rejected:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, guarded)

    async def _reject(self, send: Send, limit: int) -> None:
        body = json.dumps(
            error_body(
                "invalid_request_error",
                f"Request body larger than {limit} bytes",
                "payload_too_large",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
