"""Each worker's event feed: one poller per process, its events fanned out to every stream.

A stream (``GET /api/events/`` as ``text/event-stream``, support.api.events) holds no thread
and no database connection while it waits: it waits on the feed of its worker process (one
per event loop), which alone reads the database, and only while it has streams:

- its own connection to PostgreSQL (``SUPPORT_LISTEN_DATABASE_URL``, straight to the server
  when ``DATABASE_URL`` goes through a pooler; ``application_name`` ``support-events``),
  outside Django's pool and threads (psycopg's asyncio connection);
- every ``SUPPORT_EVENTS_POLL_SECONDS`` (0.1 s) it reads the events after its horizon with the
  snapshot that says how far they are final, and advances the horizon by the rule of
  support.services.events. It polls rather than LISTENs: a notification per write would make
  every write notify (every change writes an event), and PostgreSQL serializes the commits
  of notifying transactions;
- it keeps the last ``SUPPORT_EVENTS_BUFFER`` (10,000) final events, each rendered once as
  its SSE message; every stream picks from them what its caller sees;
- when its connection fails it connects again, backing off up to 5 s; streams just wait (and
  keep their heartbeats): their cursors say where they are, nothing is lost.

A stream whose cursor is older than the buffer (a resume, or a reader that fell more than the
buffer behind) reads from the database instead, in pages, in its request's thread, up to the
feed's horizon, then goes on from the buffer. Streams keep no queue of their own: a slow
reader costs no memory, and a reader too slow for the buffer pays with database pages, as if
it had reconnected.

On SQLite (the quick start) the feed polls through Django's ORM in a worker thread: writers
commit one at a time, so what it sees is final.
"""

import asyncio
import contextlib
import contextvars
import json
import logging
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, connection
from django.db.models import Max

from support import live
from support.api.serializers import event_json
from support.models import TicketEvent
from support.services.events import (
    EVENT_FIELDS,
    SNAPSHOT_ROWS_SQL,
    SNAPSHOT_TOP_SQL,
    Horizon,
    Snapshot,
)

try:
    import psycopg
except ImportError:  # SQLite-only installs
    psycopg = None

log = logging.getLogger("support.feed")

APPLICATION_NAME = "support-events"
READ = 1000  # events per poll; a full read that moved the horizon is followed by the next at once
RETRY_FIRST, RETRY_MAX = 0.1, 5.0  # reconnection backoff, seconds


def _expected_failure(exc: Exception) -> bool:
    """A database or network failure (logged in one line), not a bug (logged with its trace)."""
    database = (psycopg.Error,) if psycopg is not None else ()
    return isinstance(exc, (*database, DatabaseError, OSError, TimeoutError))


def sse_message(row: dict) -> bytes:
    """One event as Server-Sent Events: its id (the cursor), its kind, its JSON on one line."""
    data = json.dumps(event_json(row), separators=(",", ":"))  # ASCII: no line breaks inside
    return f"id: {row['id']}\nevent: {row['kind']}\ndata: {data}\n\n".encode()


@dataclass(frozen=True, slots=True)
class FeedEvent:
    id: int
    agent_id: int | None
    previous_agent_id: int | None
    message: bytes


class _Postgres:
    """The feed's own asyncio connection to PostgreSQL."""

    def __init__(self):
        self.conn = None

    async def open(self) -> None:
        self.conn = await psycopg.AsyncConnection.connect(
            **live.conninfo(APPLICATION_NAME),
            autocommit=True,
            # a poll's commit holds only its fence (support.services.events): no disk wait
            options=(
                f"-c TimeZone=UTC -c statement_timeout={settings.DB_STATEMENT_TIMEOUT_MS}"
                " -c synchronous_commit=off"
            ),
        )

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _fetch(self, sql: str, params: dict) -> list[tuple]:
        # A server that stopped answering (a network cut) is a failure too, not a hang.
        async with asyncio.timeout(settings.DB_STATEMENT_TIMEOUT_MS / 1000 + 5):
            cursor = await self.conn.execute(sql, params)
            return await cursor.fetchall()

    async def top(self) -> Snapshot:
        [(xmin, fence, top, _)] = await self._fetch(SNAPSHOT_TOP_SQL, {"after": 0, "limit": 0})
        return Snapshot(xmin, fence, (), top or 0)

    async def poll(self, after: int) -> tuple[Snapshot, list[dict]]:
        records = await self._fetch(SNAPSHOT_ROWS_SQL, {"after": after, "limit": READ})
        rows = [dict(zip(EVENT_FIELDS, r[2:], strict=True)) for r in records if r[2] is not None]
        xmin, fence = records[0][:2]
        ids = tuple(row["id"] for row in rows)
        return Snapshot(xmin, fence, ids, ids[-1] if ids else after), rows


class _Sqlite:
    """Polls through the ORM in a worker thread: what SQLite shows is final."""

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    @staticmethod
    async def _in_thread(read):
        def call():
            try:
                return read()
            finally:
                connection.close()  # a thread of the loop's default executor: keep nothing

        return await sync_to_async(call, thread_sensitive=False)()

    async def top(self) -> Snapshot:
        top = await self._in_thread(lambda: TicketEvent.objects.aggregate(top=Max("id"))["top"])
        return Snapshot(0, 0, (), top or 0)

    async def poll(self, after: int) -> tuple[Snapshot, list[dict]]:
        queryset = TicketEvent.objects.filter(id__gt=after).order_by("id")
        rows = await self._in_thread(lambda: list(queryset.values(*EVENT_FIELDS)[:READ]))
        ids = tuple(row["id"] for row in rows)
        return Snapshot(0, 0, ids, ids[-1] if ids else after), rows


class Feed:
    """One event loop's feed, running while it has subscribers (see the module).

    Every event with ``floor < id <= final`` is in the buffer; ``final`` is None until the
    feed has found its first horizon. Used from its loop's thread only.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.subscribers = 0
        self.final: int | None = None
        self.floor: int | None = None
        self._polled = False  # a poll succeeded since the last (re)connection
        self._events: deque[FeedEvent] = deque()
        self._wake = asyncio.Event()
        self.stopping = False  # the worker is told to stop: streams end, clients reconnect
        self._forget_stop = live.on_stop(self._stopping)
        self._source = _Postgres() if connection.vendor == "postgresql" else _Sqlite()
        # A context of its own: not the request's that started it (its thread, its id).
        self._task = loop.create_task(
            self._run(), name="support-events-feed", context=contextvars.Context()
        )

    @property
    def wake(self) -> asyncio.Event:
        """Set at the next change of the horizon: take it before looking at the feed."""
        return self._wake

    def since(self, cursor: int) -> tuple[list[FeedEvent], int]:
        """The buffered events after ``cursor`` (which must be at least ``floor``), and the
        horizon they reach."""
        found = []
        for event in reversed(self._events):
            if event.id <= cursor:
                break
            found.append(event)
        found.reverse()
        return found, self.final

    def stop(self) -> None:
        self._forget_stop()
        self._task.cancel()

    def _stopping(self) -> None:
        self.stopping = True
        self._wake.set()

    def _advanced(self, final: int, rows: list[dict]) -> None:
        for row in rows:
            if row["id"] <= final:
                agents = row["agent_id"], row["previous_agent_id"]
                self._events.append(FeedEvent(row["id"], *agents, sse_message(row)))
        while len(self._events) > settings.SUPPORT_EVENTS_BUFFER:
            self.floor = self._events.popleft().id
        self.final = final
        self._wake.set()
        self._wake = asyncio.Event()

    async def _run(self) -> None:
        delay = RETRY_FIRST
        try:
            while True:
                self._polled = False
                try:
                    await self._source.open()
                    await self._follow()
                except Exception as exc:
                    if self._polled:  # it worked a while: a new failure starts a new backoff
                        delay = RETRY_FIRST
                    log.warning(
                        "event feed: %s; connecting again in %.1f s",
                        exc,
                        delay,
                        exc_info=not _expected_failure(exc),
                    )
                    await self._source.close()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
        finally:
            await self._source.close()

    async def _follow(self) -> None:
        poll = settings.SUPPORT_EVENTS_POLL_SECONDS
        if self.final is None:
            start = await self._start(poll)
            self.floor = start
            self._advanced(start, [])
        horizon = Horizon(self.final)  # a new connection: earlier snapshots are forgotten
        while True:
            snap, rows = await self._source.poll(horizon.final)
            self._polled = True
            full = len(rows) == READ
            before = horizon.final
            final = horizon.advance(snap, reach=snap.top if full else None)
            if final > before:
                self._advanced(final, rows)
            if not (full and final > before):  # at once only while a backlog moves
                await asyncio.sleep(poll)

    async def _start(self, poll: float) -> int:
        """The first horizon: the highest id visible now, once it is final."""
        horizon = Horizon(0)
        target = None
        while True:
            snap = await self._source.top()
            if target is None:
                target = snap.top
            if horizon.advance(snap) >= target:
                return horizon.final
            await asyncio.sleep(poll)


_feeds: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Feed]" = weakref.WeakKeyDictionary()


def current_feed() -> Feed | None:
    """The running loop's feed, if it runs."""
    return _feeds.get(asyncio.get_running_loop())


@contextlib.contextmanager
def subscription() -> Iterator[Feed]:
    """The running loop's feed, started if it was not, for as long as the block runs; the
    last subscriber out stops it (its connection closed, its buffer dropped)."""
    loop = asyncio.get_running_loop()
    feed = _feeds.get(loop)
    if feed is None:
        feed = _feeds[loop] = Feed(loop)
    feed.subscribers += 1
    try:
        yield feed
    finally:
        feed.subscribers -= 1
        if feed.subscribers == 0:
            feed.stop()
            if _feeds.get(loop) is feed:
                del _feeds[loop]
