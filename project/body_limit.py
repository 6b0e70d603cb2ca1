"""ASGI wrapper that refuses request bodies over a limit with 413, declared or streamed.

Django checks Content-Length only when a view reads the body, and reads a chunked body whole
before any view runs; this stops both at the edge so no oversized body is buffered. A streamed
body that passes the limit is cut off by telling Django the client went away (Django then
closes its buffer and gives up on the request), and the 413 is sent here.
"""

import json

_TOO_LARGE = json.dumps({"detail": "Request body too large."}).encode()


class BodySizeLimit:
    def __init__(self, app, *, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.max_bytes):
                return await self._respond(send)
        received = 0
        refused = False
        started = False

        async def limited_receive():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, tracked_send)
        if refused and not started:
            await self._respond(send)

    @staticmethod
    async def _respond(send):
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(_TOO_LARGE)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": _TOO_LARGE})
