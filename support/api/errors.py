"""One place that turns refusals into HTTP answers, each with a ``detail`` a person can act on."""

import logging

try:
    from psycopg.errors import LockNotAvailable
except ImportError:  # SQLite-only installs
    LockNotAvailable = type("LockNotAvailable", (Exception,), {})

from django.core.exceptions import RequestDataTooBig
from django.db import DataError, IntegrityError, OperationalError
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from support import services
from support.api.conditional import etag
from support.observability import LOCK_TIMEOUTS

log = logging.getLogger("support.api")

DB_UNAVAILABLE = "The database is unavailable or busy; try again shortly."


def exception_handler(exc, context):
    if isinstance(exc, services.TransitionNotAllowed):
        return Response(
            {"detail": exc.detail, "current_status": exc.current, "allowed": list(exc.allowed)},
            status=status.HTTP_409_CONFLICT,
        )
    if isinstance(exc, services.VersionMismatch):
        return Response(
            {"detail": exc.detail},
            status=status.HTTP_412_PRECONDITION_FAILED,
            headers={"ETag": etag(exc.ticket_id, exc.version)},
        )
    if isinstance(exc, services.Conflict):
        return Response({"detail": exc.detail}, status=status.HTTP_409_CONFLICT)
    if isinstance(exc, services.NotFound):
        exc = exceptions.NotFound(exc.detail)
    elif isinstance(exc, services.InvalidField):
        exc = exceptions.ValidationError({exc.field: [exc.detail]})
    elif isinstance(exc, services.AgentInactive):
        exc = exceptions.AuthenticationFailed(exc.detail)
        exc.auth_header = "Token"
    elif isinstance(exc, services.NotAnAgent):
        exc = exceptions.PermissionDenied(exc.detail)
    elif isinstance(exc, RequestDataTooBig):
        return Response(
            {"detail": "Request body too large."}, status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
        )
    elif isinstance(exc, OperationalError):
        if isinstance(exc.__cause__, LockNotAvailable):
            LOCK_TIMEOUTS.inc()
        log.warning("database unavailable: %s", exc)
        return database_unavailable_response()
    elif isinstance(exc, DataError):
        log.warning("database refused a value: %s", exc)
        return Response({"detail": "A value is out of range or malformed."}, status=400)
    elif isinstance(exc, IntegrityError):
        # The database's constraints are the last line of defence: a race the services did not
        # foresee is a conflict for the client to retry, not a crash.
        log.warning("constraint refused a change: %s", exc)
        return Response(
            {"detail": "A concurrent change conflicted with this one; try again."},
            status=status.HTTP_409_CONFLICT,
        )
    return drf_exception_handler(exc, context)


def database_unavailable_response() -> Response:
    return Response(
        {"detail": DB_UNAVAILABLE},
        status=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "1"},
    )
