"""``/healthz`` and ``/readyz``, answered in front of Django (no host check, no middleware).

``/healthz``: the process answers; nothing else is asked. ``/readyz``: the database answers
``SELECT 1`` within READYZ_TIMEOUT seconds, else 503 with the reason.
"""

import asyncio
import json

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, connection


def _ping_database() -> None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    finally:
        connection.close()  # outside a request nothing else returns it to the pool


async def _readiness() -> tuple[int, dict]:
    timeout = settings.READYZ_TIMEOUT
    try:
        await asyncio.wait_for(
            sync_to_async(_ping_database, thread_sensitive=False)(), timeout=timeout
        )
    except TimeoutError:
        return 503, {"status": "unavailable", "reason": f"database: no answer in {timeout}s"}
    except DatabaseError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return 503, {"status": "unavailable", "reason": f"database: {reason}"}
    return 200, {"status": "ok"}


async def _answer(send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def with_health(app):
    async def wrapper(scope, receive, send):
        if scope["type"] == "http":
            if scope["path"] == "/healthz":
                return await _answer(send, 200, {"status": "ok"})
            if scope["path"] == "/readyz":
                return await _answer(send, *await _readiness())
        return await app(scope, receive, send)

    return wrapper
