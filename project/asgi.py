"""The served app: ``uvicorn project.asgi:application``."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

django_application = get_asgi_application()

from django.conf import settings  # noqa: E402  (after Django is set up)

from project.body_limit import BodySizeLimit  # noqa: E402

_HEALTHZ_BODY = b'{"status":"ok"}'


async def _healthz(scope, receive, send):
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": _HEALTHZ_BODY})


def _with_healthz(app):
    """``/healthz`` answers from the process itself: no database, no host check, no Django."""

    async def wrapper(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/healthz":
            return await _healthz(scope, receive, send)
        return await app(scope, receive, send)

    return wrapper


application = _with_healthz(
    BodySizeLimit(django_application, max_bytes=settings.MAX_REQUEST_BODY_BYTES)
)
