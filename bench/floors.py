"""The floors under the service: what a request costs before any of the service's own code.

Each floor answers ``GET /bench/floor/`` with the same JSON, served by uvicorn exactly as
``python -m project.serve`` serves the service (``uvicorn.run`` with the lifespan protocol off,
uvicorn's access log off, forwarded headers, the same workers) but without the service's
settings:

- ``django``: a bare Django project (bench/django_floor.py: no middleware, no apps, one
  ``async def`` view returning ``JsonResponse``) under Django's default handler,
  ``django.core.asgi.get_asgi_application()``;
- ``django-pooled``: the same project under the service's own handler,
  ``project.handler.PooledASGIHandler()``;
- ``asgi``: a bare ASGI app sending the same bytes.

The service floor (``/bench/floor/`` through the whole stack) is the service itself
(support/api/floor.py). ``python -m bench.floors NAME --port N --workers N`` serves one.
"""

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

APPS = {
    "django": "bench.floors:django_default",
    "django-pooled": "bench.floors:django_pooled",
    "asgi": "bench.floors:asgi",
}
PATH = "/bench/floor/"
BODY = b'{"ok": true}'  # JsonResponse({"ok": True}), byte for byte


def _django_setup() -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.django_floor"
    import django

    django.setup(set_prefix=False)


def django_default():
    """Django's default handler, as ``get_asgi_application()`` builds it."""
    from django.core.asgi import get_asgi_application

    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.django_floor"
    return get_asgi_application()


def django_pooled():
    """The service's pooled handler around the same bare project."""
    _django_setup()
    try:
        from project.handler import PooledASGIHandler
    except ImportError as exc:
        raise SystemExit(
            f"the pooled floor needs project.handler.PooledASGIHandler: {exc}"
        ) from exc
    return PooledASGIHandler()


def asgi():
    return _asgi_floor


_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]


async def _asgi_floor(scope, receive, send):
    if scope["type"] != "http":  # the lifespan protocol is off, as for the service
        return
    found = scope["path"] == PATH
    await send(
        {
            "type": "http.response.start",
            "status": 200 if found else 404,
            "headers": _HEADERS if found else [(b"content-length", b"0")],
        }
    )
    await send({"type": "http.response.body", "body": BODY if found else b""})


# --- The driver's side ----------------------------------------------------------------------
@contextmanager
def serve(
    name: str, *, workers: int, python: str = sys.executable, env: dict | None = None
) -> Iterator:
    """Serve floor ``name`` on a free loopback port with ``python``; yields a
    tests.servers.Server once ``/bench/floor/`` answers, and always stops it (the whole process
    group). ``env`` adds to the environment."""
    from tests.pg_cluster import free_port
    from tests.servers import serve_process

    port = free_port()
    command = [python, "-m", "bench.floors", name, "--port", str(port), "--workers", str(workers)]
    env = {**os.environ, **(env or {})}
    with serve_process(
        command, port=port, env=env, workers=workers, ready_path=PATH, label=f"floor-{name}"
    ) as server:
        yield server


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Serve one benchmark floor.")
    parser.add_argument("name", choices=sorted(APPS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    import uvicorn

    # project/serve.py's uvicorn settings, without the service's own logging configuration
    uvicorn.run(
        APPS[args.name],
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        lifespan="off",
        proxy_headers=True,
        access_log=False,
        timeout_graceful_shutdown=20,
    )


if __name__ == "__main__":
    main()
