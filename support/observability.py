"""Request ids, structured logs and Prometheus metrics.

- Every request gets an id: the client's ``X-Request-ID`` when it is a plain token, a new one
  otherwise. It is returned in the response header and attached to every log line written
  while the request runs (the context variable follows ``sync_to_async`` into worker threads).
- One log line per request (logger ``support.request``): method, route, status, duration, id.
- Metrics use prometheus-client; with ``PROMETHEUS_MULTIPROC_DIR`` set (several uvicorn
  workers) each process writes its samples there and ``/metrics`` adds them up.
"""

import logging
import os
import random
import re
import time

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from prometheus_client import Counter, Gauge, Histogram

from project.logs import RequestIdFilter, request_id_var

__all__ = ["RequestIdFilter", "log_event", "request_id_var"]

# In multiprocess mode every metric below writes to this folder as it is created: a missing one
# would make any command that loads the app fail (python -m project.serve prepares it).
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

_CLEAN_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

access_log = logging.getLogger("support.request")
events_log = logging.getLogger("support.events")

# --- Metrics (names follow Prometheus conventions; labels stay low-cardinality) -------------
REQUESTS = Counter(
    "support_http_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
LATENCY = Histogram(
    "support_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["method", "route"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TOPUP_ASSIGNED = Histogram(
    "support_topup_assigned_tickets",
    "Tickets assigned by one agent top-up (fetches that had room)",
    buckets=(0, 1, 2, 5, 10, 15, 25, 50),
)
TOPUP_POOL_EMPTY = Counter(
    "support_topup_pool_empty_total", "Top-ups that had room but found no open ticket"
)
CAP_REFUSALS = Counter(
    "support_cap_refusals_total", "Assignments refused because the agent was at the cap"
)
AGENT_LOCK_WAIT = Histogram(
    "support_agent_lock_wait_seconds",
    "Time spent acquiring agent-row locks",
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 3),
)
LOCK_TIMEOUTS = Counter(
    "support_lock_timeouts_total", "Requests that gave up waiting for a database lock"
)
WAITING_AGENTS = Gauge(
    "support_waiting_agents",
    "Fetches waiting for tickets to enter the pool (GET /api/agent/tickets/?wait=N)",
    multiprocess_mode="livesum",
)
POOL_LISTENING = Gauge(
    "support_pool_listening",
    "1 while the worker's listening connection is up (0: its waiters poll the pool)",
    multiprocess_mode="liveall",
)
IDLE_RELEASED = Counter(
    "support_idle_released_tickets_total",
    "Assigned tickets returned to the pool because their agent was silent too long",
)


def log_event(message: str, **fields) -> None:
    """An application event (assignment, refusal...), with the current request id."""
    events_log.info(message, extra={"event": message, **fields})


# Request ids: unique, not secret: 128 random bits without uuid4's system call.
# A generator of its own, seeded from the system: the process-wide one is left to the program
# that seeds it (tests, Hypothesis), and this module's draws from another thread never move it.
_ids = random.Random()  # noqa: S311 (unique ids, not secrets)


def _request_id(request) -> str:
    given = request.META.get("HTTP_X_REQUEST_ID", "")
    return given if _CLEAN_ID.match(given) else f"{_ids.getrandbits(128):032x}"


def _route(request) -> str:
    match = getattr(request, "resolver_match", None)
    return "/" + match.route if match is not None and match.route else "unmatched"


class RequestLogMiddleware:
    """Outermost middleware: the request id, the access log line and the request metrics."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.is_async:
            return self._acall(request)
        token, started = self._start(request)
        try:
            return self._finish(request, self.get_response(request), started)
        finally:
            request_id_var.reset(token)

    async def _acall(self, request):
        token, started = self._start(request)
        try:
            return self._finish(request, await self.get_response(request), started)
        finally:
            request_id_var.reset(token)

    @staticmethod
    def _start(request):
        request.request_id = _request_id(request)
        return request_id_var.set(request.request_id), time.perf_counter()

    @staticmethod
    def _finish(request, response, started):
        duration = time.perf_counter() - started
        route = _route(request)
        REQUESTS.labels(request.method, route, str(response.status_code)).inc()
        LATENCY.labels(request.method, route).observe(duration)
        response["X-Request-ID"] = request.request_id
        access_log.info(
            "%s %s %s",
            request.method,
            route,
            response.status_code,
            extra={
                "request_id": request.request_id,
                "method": request.method,
                "route": route,
                "path": request.path,
                "client": request.META.get("REMOTE_ADDR", ""),
                "status": response.status_code,
                "duration_ms": round(duration * 1000, 3),
            },
        )
        return response
