"""Log records for people and machines: the request id on every line, ISO 8601 times.

Kept apart from ``support.observability`` (which creates the Prometheus metrics) so that the
process that starts the workers (``project.serve``) can log like them without writing metrics.
"""

import contextvars
import logging
from datetime import UTC, datetime

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every record (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class UnhandledOnly(logging.Filter):
    """For ``django.request``: only crashes (with their traceback). Every answer, 5xx included,
    already has its line from ``support.request``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is not None


def _iso(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")


class JsonFormatter(_JsonFormatter):
    """One JSON object per line; ``time`` in ISO 8601 with its offset."""

    def formatTime(self, record, datefmt=None):
        return _iso(record)

    def add_fields(self, log_data, record, message_dict):
        super().add_fields(log_data, record, message_dict)
        log_data.pop("color_message", None)  # uvicorn's copy of the message, with ANSI colours


class TextFormatter(logging.Formatter):
    def formatTime(self, record, datefmt=None):
        return _iso(record)
