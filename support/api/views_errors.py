"""JSON answers for errors Django raises outside the API views (unknown paths, bad hosts)."""

import sys

from django.db import OperationalError
from django.http import JsonResponse

from support.api.errors import DB_UNAVAILABLE


def bad_request(request, exception=None):
    return JsonResponse({"detail": "Bad request."}, status=400)


def not_found(request, exception=None):
    return JsonResponse({"detail": "Not found."}, status=404)


def database_unavailable() -> JsonResponse:
    """503 for a database that is down or busy, or no request thread free, outside DRF's views
    (``support.api.errors`` answers it inside them)."""
    response = JsonResponse({"detail": DB_UNAVAILABLE}, status=503)
    response["Retry-After"] = "1"
    return response


def server_error(request):
    # Called while Django handles the exception: one from the database (down, busy, no request
    # thread free: project/handler.py) that reached here from a non-API view is a 503, as in
    # the API.
    if isinstance(sys.exc_info()[1], OperationalError):
        return database_unavailable()
    return JsonResponse({"detail": "Internal server error."}, status=500)
