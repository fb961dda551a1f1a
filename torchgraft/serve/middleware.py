"""ASGI middleware: the API key, the request-body cap and the structured access log.

Plain ASGI (no framework types), each one concern:
- `APIKeyGuard`: with a key set, every `/v1/...` request needs `Authorization: Bearer KEY`
  (compared with `hmac.compare_digest`, constant time); `/health` stays open.
- `BodyLimit`: a body over `max_bytes` gets a 413 before it is read (Content-Length) or as soon as
  the streamed bytes pass the cap (chunked uploads).
- `AccessLog`: one JSON line per request on the `torchgraft.serve.access` logger: time, client,
  method, path, status, duration, bytes sent, request id (also sent back as `x-request-id`).
Errors are OpenAI's JSON shape (`errors.error_body`).
"""
from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from typing import Any, Awaitable, Callable

from torchgraft.serve.errors import error_body

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("torchgraft.serve.access")


async def send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v
    return None


class APIKeyGuard:
    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        auth = _header(scope, b"authorization") or b""
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        if not hmac.compare_digest(given, self.key):
            return await send_json(send, 401, error_body(
                "invalid or missing API key (send 'Authorization: Bearer KEY')", "invalid_request_error",
                None, "invalid_api_key"), [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _refuse(self) -> dict[str, Any]:
        return error_body(f"request body over {self.max_bytes} bytes (torchgraft serve --max-body)",
                          "invalid_request_error", None, "body_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await send_json(send, 413, self._refuse())
        seen = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await send_json(send, 413, self._refuse())


class AccessLog:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:16]
        t0 = time.perf_counter()
        status, sent = 500, 0

        async def logging_send(message: dict[str, Any]) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, logging_send)
        finally:
            client = scope.get("client") or ("", 0)
            access_log.info(json.dumps({
                "ts": round(time.time(), 3), "request_id": rid, "client": f"{client[0]}:{client[1]}",
                "method": scope.get("method"), "path": scope.get("path"), "status": status,
                "ms": round((time.perf_counter() - t0) * 1000, 1), "bytes": sent}))
