"""The served app: ``uvicorn project.asgi:application`` (``python -m project.serve`` runs it)."""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django.setup(set_prefix=False)  # what django.core.asgi.get_asgi_application does first

from django.conf import settings  # noqa: E402  (after Django is set up)

from project.body_limit import BodySizeLimit  # noqa: E402
from project.handler import PooledASGIHandler  # noqa: E402
from project.health import with_health  # noqa: E402

django_application = PooledASGIHandler()

application = with_health(
    BodySizeLimit(django_application, max_bytes=settings.MAX_REQUEST_BODY_BYTES)
)
