"""Answers 503 (JSON) when the database fails outside a DRF view, e.g. in the admin site."""

import json
import logging

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.db import OperationalError
from django.http import HttpResponse

log = logging.getLogger("support.api")


class DatabaseUnavailableMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, OperationalError):
            return None
        from support.api.errors import DB_UNAVAILABLE

        log.warning("database unavailable: %s", exception)
        response = HttpResponse(
            json.dumps({"detail": DB_UNAVAILABLE}), status=503, content_type="application/json"
        )
        response["Retry-After"] = "1"
        return response
