"""``/metrics`` for Prometheus, readable as configured (METRICS_TOKEN, METRICS_PUBLIC)."""

import hmac
import multiprocessing
import os

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from drf_spectacular.utils import extend_schema
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from rest_framework import permissions

from support.api.auth import IsAdmin
from support.api.views import APIView
from support.models import Ticket


class OpenTicketsCollector:
    """The number of open tickets, counted when scraped (the pool's partial index answers)."""

    NAME, HELP = "support_open_tickets", "Tickets in status open (the pool)"

    def describe(self):  # lets a registry learn the name without querying
        yield GaugeMetricFamily(self.NAME, self.HELP)

    def collect(self):
        gauge = GaugeMetricFamily(self.NAME, self.HELP)
        gauge.add_metric([], Ticket.objects.filter(status=Ticket.Status.OPEN).count())
        yield gauge


_MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
if not _MULTIPROCESS:
    REGISTRY.register(OpenTicketsCollector())


class MetricsNotShared(Exception):
    """A worker of a multi-process server without a shared metrics folder."""


def _scrape() -> bytes:
    if not _MULTIPROCESS:
        if multiprocessing.parent_process() is not None:
            # one worker among several: its own counts would pass for the whole server's
            raise MetricsNotShared
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # every worker's samples, added up
    registry.register(OpenTicketsCollector())
    return generate_latest(registry)


class MetricsAccess(permissions.BasePermission):
    """A bearer token when METRICS_TOKEN is set; anyone when METRICS_PUBLIC; else admins."""

    message = "Metrics are for admins, or for the holder of the metrics token."

    def has_permission(self, request, view):
        if settings.METRICS_TOKEN:
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {settings.METRICS_TOKEN}"
            return hmac.compare_digest(given.encode(), expected.encode())
        if settings.METRICS_PUBLIC:
            return True
        return IsAdmin().has_permission(request, view)


class MetricsView(APIView):
    permission_classes = [MetricsAccess]

    @extend_schema(exclude=True)
    async def get(self, request):
        return await self.in_thread(self._answer)

    @staticmethod
    def _answer():
        try:
            return HttpResponse(_scrape(), content_type=CONTENT_TYPE_LATEST)
        except MetricsNotShared:
            detail = (
                "This worker's metrics are only its share: serve with python -m project.serve,"
                " or give the workers a shared PROMETHEUS_MULTIPROC_DIR."
            )
            return JsonResponse({"detail": detail}, status=503)
