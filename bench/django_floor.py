"""The bare Django project of the Django floor (bench/floors.py): settings and URLs in one module.

No middleware, no installed apps, no database: one URL to an ``async def`` view that returns
``JsonResponse({"ok": True})``. What is left per request is Django's ASGI handler itself:
request object, URL resolution, the view, the response. Only the benchmark uses it
(``DJANGO_SETTINGS_MODULE=bench.django_floor``).

The service's pooled handler (``django-pooled``) reads two settings of its own; they are set
here as the service sets them by default (its thread pool as large as its database pool).
"""

import os

from django.http import JsonResponse
from django.urls import path

SECRET_KEY = "bench-floor-only-" + "k" * 40
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1"]
ROOT_URLCONF = __name__
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
DATABASES: dict = {}
USE_TZ = True

# project.handler.PooledASGIHandler's own settings (project/settings.py's defaults)
SUPPORT_REQUEST_THREADS = int(os.environ.get("SUPPORT_REQUEST_THREADS", "10"))
DB_POOL_TIMEOUT = 5.0


async def floor(request):
    return JsonResponse({"ok": True})


urlpatterns = [path("bench/floor/", floor)]
