"""The live event feed, ``GET /api/events/``: the ticket history as it happens, in id order.

Two representations of one feed, chosen by the ``Accept`` header:

- ``text/event-stream`` (what a browser's ``EventSource`` sends): Server-Sent Events, one per
  ticket event (``id:`` its id, ``event:`` its kind, ``data:`` its JSON), a ``: ping``
  comment every ``SUPPORT_EVENTS_HEARTBEAT_SECONDS``. It starts after ``Last-Event-ID``
  (what ``EventSource`` sends when it reconnects), else ``?after=``, else now. The stream
  waits on its worker's feed (support.api.feed) without a thread or a connection.
- anything else: a JSON page, ``{"events": [...], "next_after": id}``, for clients that
  cannot hold a stream: the caller's events after ``?after=`` (now without it), at most
  ``?limit=`` (100; 1 to 1000); ask again with ``after=next_after``.

Both serve only final events (support.services.events: none can appear later below them), so
a client that goes on from the last id it got loses none and gets none twice, whichever worker
serves it and across restarts. An admin sees every event, an agent those of the tickets it
held around them (support.services.events.Viewer).

The caller is checked when it connects (the usual DRF checks, in the request's one thread
hop) and, for a stream, again every heartbeat: a revoked or expired token, a deactivated user
or a lost role ends the stream (the client's reconnection then gets its 401 or 403).
"""

import asyncio
import re

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError
from django.http import StreamingHttpResponse
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, status
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from project.handler import release_request_thread
from support.api import feed
from support.api.auth import IsAdmin, IsAgent, authenticate_again
from support.api.schema import EVENTS_DESCRIPTION, EVENTS_PARAMETERS, EVENTS_RESPONSES
from support.api.serializers import event_json
from support.api.views import APIView
from support.services.events import HorizonUnknown, Viewer, events_page, visible_events

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
CATCH_UP = 500  # events per database page of a stream behind the feed's buffer
RETRY_MS = 1000  # EventSource waits this long before it reconnects

_ID = re.compile(r"[0-9]{1,18}")  # an event id: a 64-bit integer, digits only
_LIMIT = re.compile(r"[0-9]{1,4}")
PING = b": ping\n\n"


def wants_stream(request) -> bool:
    """Whether a GET asks for ``text/event-stream`` (not with ``q=0``)."""
    if request.method != "GET":
        return False
    for item in request.META.get("HTTP_ACCEPT", "").split(","):
        media, *params = (part.strip().lower() for part in item.split(";"))
        if media == "text/event-stream":
            return not any(re.fullmatch(r"q=0(\.0*)?", param) for param in params)
    return False


def viewer_of(user) -> Viewer | None:
    """Whose events ``user`` sees: an admin every event, an agent its own; None: neither."""
    if user is None or not user.is_active:
        return None
    if user.is_staff:
        return Viewer(None)
    return Viewer(user.pk) if getattr(user, "is_agent", False) else None


def _event_id(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    if not _ID.fullmatch(value):
        raise exceptions.ValidationError({name: ["An event id: digits only, at most 18."]})
    return int(value)


def _limit(request) -> int:
    value = request.query_params.get("limit")
    if value is None:
        return DEFAULT_LIMIT
    if not _LIMIT.fullmatch(value) or not 1 <= int(value) <= MAX_LIMIT:
        raise exceptions.ValidationError({"limit": [f"An integer from 1 to {MAX_LIMIT}."]})
    return int(value)


async def _hop(fn, *args, **kwargs):
    """A blocking call of a stream after its answer began: on the request's thread, given
    back at once (a stream holds none while it waits)."""
    try:
        return await sync_to_async(fn)(*args, **kwargs)
    finally:
        release_request_thread()


class EventFeedView(APIView):
    permission_classes = [IsAdmin | IsAgent]
    renderer_classes = [JSONRenderer]  # the stream is chosen before DRF's negotiation

    def perform_content_negotiation(self, request, force=False):
        # text/event-stream is served by get() itself; everything else, errors included, is
        # JSON (never 406).
        return super().perform_content_negotiation(request, force=True)

    @extend_schema(
        operation_id="events_feed",
        description=EVENTS_DESCRIPTION,
        parameters=EVENTS_PARAMETERS,
        responses=EVENTS_RESPONSES,
    )
    async def get(self, request):
        if not wants_stream(request):
            return await self.in_thread(self._page, request)
        viewer, cursor = await self.in_thread(self._open, request)
        response = StreamingHttpResponse(
            self._stream(request, viewer, cursor), content_type="text/event-stream"
        )
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
        response["Vary"] = "Accept"
        return response

    def _page(self, request):
        after = _event_id(request.query_params.get("after"), "after")
        limit = _limit(request)
        try:
            page = events_page(viewer_of(request.user), after=after, limit=limit)
        except HorizonUnknown as exc:
            return Response(
                {"detail": str(exc)},
                status=status.HTTP_503_SERVICE_UNAVAILABLE,
                headers={"Retry-After": "1"},
            )
        body = {"events": [event_json(row) for row in page.events], "next_after": page.next_after}
        return Response(body, headers={"Cache-Control": "no-cache", "Vary": "Accept"})

    def _open(self, request):
        after = _event_id(request.query_params.get("after"), "after")
        _limit(request)  # pages only, but a bad value is refused here too
        resume = _event_id(request.META.get("HTTP_LAST_EVENT_ID"), "Last-Event-ID")
        return viewer_of(request.user), resume if resume is not None else after

    def _still_allowed(self, request, viewer: Viewer) -> bool:
        return viewer_of(authenticate_again(request)) == viewer

    async def _stream(self, request, viewer: Viewer, cursor: int | None):
        """The SSE body: from the feed's buffer, or from the database while the cursor is
        older than the buffer; a heartbeat (and the caller checked again) every interval."""
        loop = asyncio.get_running_loop()
        beat = settings.SUPPORT_EVENTS_HEARTBEAT_SECONDS
        yield f"retry: {RETRY_MS}\n\n".encode()
        with feed.subscription() as events:
            next_beat = loop.time() + beat
            while True:
                if loop.time() >= next_beat:
                    try:
                        allowed = await _hop(self._still_allowed, request, viewer)
                    except DatabaseError:
                        return  # the client reconnects, and is checked then
                    if not allowed:
                        yield b": the caller may no longer read this stream\n\n"
                        return
                    # the position rides on the heartbeat: a client that saw nothing of late
                    # (an agent's, a quiet stream's) resumes from here, not from "now"
                    yield PING if cursor is None else b": ping\nid: %d\n\n" % cursor
                    next_beat = loop.time() + beat
                wake = events.wake  # before looking: an advance from here on wakes us
                if events.stopping:
                    return  # the worker stops: the client reconnects to one that runs
                if events.final is not None:
                    if cursor is None:
                        cursor = events.final  # the stream starts now: say where that is
                        yield b"id: %d\n\n" % cursor
                    if cursor < events.floor:
                        upto = events.final
                        try:
                            rows = await _hop(
                                visible_events, viewer, after=cursor, upto=upto, limit=CATCH_UP
                            )
                        except DatabaseError:
                            return
                        cursor = rows[-1]["id"] if len(rows) == CATCH_UP else upto
                        if rows:
                            yield b"".join(feed.sse_message(row) for row in rows)
                        continue
                    found, upto = events.since(cursor)
                    cursor = max(cursor, upto)
                    chunk = b"".join(
                        e.message for e in found if viewer.sees(e.agent_id, e.previous_agent_id)
                    )
                    if chunk:
                        yield chunk
                        continue
                try:
                    async with asyncio.timeout(max(0.0, next_beat - loop.time())):
                        await wake.wait()
                except TimeoutError:
                    pass
