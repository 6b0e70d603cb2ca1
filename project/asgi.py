"""The served app: ``uvicorn project.asgi:application``."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

django_application = get_asgi_application()

from django.conf import settings  # noqa: E402  (after Django is set up)

from project.body_limit import BodySizeLimit  # noqa: E402
from project.health import with_health  # noqa: E402

application = with_health(
    BodySizeLimit(django_application, max_bytes=settings.MAX_REQUEST_BODY_BYTES)
)
