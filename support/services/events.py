"""The event feed's reads: who sees which event, and how far the history is final.

The feed (``GET /api/events/``, support.api.events) serves the ticket history in id order, and
a client resumes after the last id it got. That is only right if an id, once passed, can never
be followed by a lower one: no event lost, none repeated.

**The horizon.** Event ids come from a sequence when a transaction inserts its events, but
transactions commit in any order: a reader may see id X+2 committed while X+1 is still in
flight. So the feed serves only events up to the *horizon*, the id up to which every id is
final: committed and visible, or never to exist (rolled back). :class:`Horizon` advances it
from snapshots of the database, each read in one statement (:data:`SNAPSHOT_ROWS_SQL`,
:data:`SNAPSHOT_TOP_SQL`): the ``xmin`` of ``pg_current_snapshot()``, a fence (below) and the
visible ids above the cursor, in id order.

Why the rule holds (PostgreSQL 13+). Every transaction that writes events writes or locks a
ticket first (support.services.records.record), so it has a transaction id (xid) before its
events draw their ids. Take a snapshot S whose highest visible event id is ``top``, and an id
below ``top`` that S does not show. Its transaction drew it before ``top`` was drawn, and
``top``'s transaction committed before S was taken; so that transaction had its xid before S,
and was in flight at S (or rolled back). A snapshot's own ``xmax`` does not bound such xids
(it is one past the latest *completed* xid: a transaction that got its xid after that and is
still running is not in the snapshot at all), so each read takes a **fence**: the reading
statement's own ``pg_current_xact_id()``, assigned after its snapshot, so above every xid
handed out before S. Hence:

1. the unbroken run of visible ids right after the cursor is final at once;
2. when S has ``xmin`` equal to its fence, no xid below the fence was running at S: every id
   up to ``top`` is final;
3. every id up to ``top`` is final once a later snapshot has ``xmin >=`` S's fence: every
   transaction that had its xid before S has ended by then.

Each read thus costs an xid and a (tiny) commit; the feed's own connection commits those
without waiting for the disk (``synchronous_commit=off``: a fence's commit carries no data).

The rule looks at the whole id sequence, never at one agent's filtered rows: an agent's page
is read up to a horizon computed on every event. Its costs: ``xmin`` is the cluster's oldest
transaction, in any database, so an event that follows a gap waits for every transaction
older than it to end (a long one delays the feed; it never reorders it). The sequence must
hand out ids in order (PostgreSQL's identity column, CACHE 1, as Django creates it).

On SQLite writers run one at a time (``BEGIN IMMEDIATE``), so ids commit in order: whatever
is visible is final, and the horizon is simply ``max(id)``.

**Who sees an event.** An admin sees every event. An agent sees an event when it is the
ticket's agent just before or just after it: the event that gives it the ticket, everything
while it holds it (a resolved or closed ticket keeps its agent), and the event that takes it
away; nothing after. ``agent`` is the agent after the event, or before when the event took
the ticket from it; ``previous_agent`` the other one of a reassignment (migration 0012).
"""

import time
from collections import deque
from dataclasses import dataclass

from django.db import connection
from django.db.models import Q

from support.models import TicketEvent

# An event as the feed reads it: the history's row, with the ticket and both agents.
EVENT_FIELDS = (
    "id",
    "ticket_id",
    "at",
    "actor_id",
    "kind",
    "from_status",
    "to_status",
    "agent_id",
    "previous_agent_id",
    "changes",
)

# The feed's poll: the snapshot's xmin, the fence (module docstring), and the events above the
# cursor in id order (at most ``limit``), in one statement, so with one snapshot. No event:
# one row of NULLs.
SNAPSHOT_ROWS_SQL = """
    SELECT pg_snapshot_xmin(s)::text::bigint, pg_current_xact_id()::text::bigint,
           e.id, e.ticket_id, e.at, e.actor_id, e.kind, e.from_status, e.to_status,
           e.agent_id, e.previous_agent_id, e.changes
    FROM pg_current_snapshot() AS s
    LEFT JOIN LATERAL (
        SELECT * FROM support_ticketevent WHERE id > %(after)s ORDER BY id LIMIT %(limit)s
    ) AS e ON true
    ORDER BY e.id
"""

# A page's (and the feed's start's) look: xmin, the fence, the highest visible id, and the
# first ``limit`` visible ids above the cursor (for the unbroken run), in one statement.
SNAPSHOT_TOP_SQL = """
    SELECT pg_snapshot_xmin(s)::text::bigint, pg_current_xact_id()::text::bigint,
           (SELECT max(id) FROM support_ticketevent),
           ARRAY(SELECT id FROM support_ticketevent WHERE id > %(after)s
                 ORDER BY id LIMIT %(limit)s)
    FROM pg_current_snapshot() AS s
"""


@dataclass(frozen=True)
class Snapshot:
    """What one statement saw: ``ids``, the visible ids above the cursor in order (the first
    of them, when the read was limited), and ``top``, the highest visible id it knows of (at
    least the last of ``ids``); ``fence``, above every xid handed out before it. On SQLite
    ``xmin == fence == 0``: nothing is ever in flight."""

    xmin: int
    fence: int
    ids: tuple[int, ...]
    top: int


class Horizon:
    """The id up to which every event id is final, advanced by snapshots (the module's rule).

    ``final`` starts at a cursor known to be final (0 is: no id is lower) and never goes back.
    """

    MAX_FENCES = 64  # more snapshots waiting add no knowledge, only a later start

    def __init__(self, cursor: int):
        self.final = cursor
        # (top, fence) of earlier snapshots whose tops are not final yet, tops ascending
        self._fences: deque[tuple[int, int]] = deque()

    def advance(self, snap: Snapshot, *, reach: int | None = None) -> int:
        """The new horizon after ``snap``. ``reach``: the highest id the caller has in hand
        (the feed's limited read): the horizon does not pass it."""
        final = self.final
        if snap.xmin == snap.fence:  # rule 2: nothing in flight
            final = max(final, snap.top)
        for top, fence in self._fences:  # rule 3: what was in flight then has ended
            if snap.xmin >= fence:
                final = max(final, top)
        if reach is not None:
            final = max(self.final, min(final, reach))
        for id_ in snap.ids:  # rule 1: the unbroken run after it
            if id_ == final + 1:
                final = id_
            elif id_ > final:
                break
        newer = not self._fences or snap.top > self._fences[-1][0]
        if snap.top > final and newer and len(self._fences) < self.MAX_FENCES:
            self._fences.append((snap.top, snap.fence))
        while self._fences and self._fences[0][0] <= final:
            self._fences.popleft()
        self.final = final
        return final

    def waiting(self) -> bool:
        """Whether visible events above the horizon wait for transactions to end."""
        return bool(self._fences)


# --- Reads through Django's connection (a request's thread) ---------------------------------

SCAN = 1000  # ids read above the cursor to find its unbroken run
PAGE_WAIT_SECONDS = 1.0  # how long a page waits for transactions in flight
PAGE_POLL_SECONDS = 0.005


def read_top(after: int, scan: int = SCAN) -> Snapshot:
    """One look at the history: xmin, the fence, the highest visible id, the first ids after
    ``after``."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(SNAPSHOT_TOP_SQL, {"after": after, "limit": scan})
            xmin, fence, top, ids = cursor.fetchone()
        else:  # nothing is ever in flight; the unbroken run is not needed
            cursor.execute("SELECT max(id) FROM support_ticketevent")
            (top,) = cursor.fetchone()
            xmin = fence = 0
            ids = []
    return Snapshot(xmin, fence, tuple(ids), max(top or 0, after))


class HorizonUnknown(Exception):
    """No final position could be found in time (transactions stayed in flight)."""


def final_horizon(after: int | None, *, wait: float = PAGE_WAIT_SECONDS) -> int:
    """The horizon now, for a page after ``after``: waits (polling every few ms, at most
    ``wait`` seconds) until every event visible at the first look is final. When a
    transaction stays in flight longer: the horizon as far as the unbroken run after ``after``
    takes it (``after`` at least); without a cursor there is no run to walk (0 is no place to
    start one from): HorizonUnknown.
    """
    deadline = time.monotonic() + wait
    horizon = Horizon(after or 0)
    scan = SCAN if after is not None else 0
    target = None
    while True:
        snap = read_top(horizon.final, scan)
        if target is None:
            target = snap.top
        if horizon.advance(snap) >= target:
            return horizon.final
        if time.monotonic() >= deadline:
            if after is None:
                raise HorizonUnknown("Events are still being written; try again shortly.")
            return horizon.final
        time.sleep(PAGE_POLL_SECONDS)


@dataclass(frozen=True)
class Viewer:
    """Whose events: ``agent_id`` None for an admin, who sees every event."""

    agent_id: int | None

    def sees(self, agent_id: int | None, previous_agent_id: int | None) -> bool:
        """Whether this viewer sees an event with these agents; as :meth:`query`."""
        return self.agent_id is None or self.agent_id in (agent_id, previous_agent_id)

    def query(self) -> Q:
        """The same as :meth:`sees`, in SQL."""
        if self.agent_id is None:
            return Q()
        return Q(agent_id=self.agent_id) | Q(previous_agent_id=self.agent_id)


def visible_events(viewer: Viewer, *, after: int, upto: int, limit: int) -> list[dict]:
    """The viewer's events with ``after < id <= upto``, in id order, at most ``limit``; as
    rows with EVENT_FIELDS. ``upto`` must be final (a horizon).

    An agent's events are two index range reads, ``(agent_id, id)`` and
    ``(previous_agent_id, id)``, each stopping after ``limit`` rows, merged: a page costs the
    same however many events the agent has after the cursor (an OR of the two would read
    them all, then sort). SQLite cannot limit the parts of a UNION; it takes the OR.
    """
    base = (
        TicketEvent.objects.filter(id__gt=after, id__lte=upto).order_by("id").values(*EVENT_FIELDS)
    )
    agent = viewer.agent_id
    if agent is None:
        return list(base[:limit])
    if connection.features.supports_slicing_ordering_in_compound:
        holder = base.filter(agent_id=agent)[:limit]
        former = base.filter(previous_agent_id=agent)[:limit]
        return list(holder.union(former, all=True).order_by("id")[:limit])
    return list(base.filter(viewer.query())[:limit])


@dataclass(frozen=True)
class Page:
    events: list[dict]
    next_after: int


def events_page(viewer: Viewer, *, after: int | None, limit: int) -> Page:
    """A page of the feed: the viewer's final events after ``after``, at most ``limit``, and
    where the next page starts. Without ``after``: none, and the horizon now (the feed
    starts now). Raises HorizonUnknown (see :func:`final_horizon`)."""
    upto = final_horizon(after)
    if after is None:
        return Page([], upto)
    events = visible_events(viewer, after=after, upto=upto, limit=limit)
    return Page(events, events[-1]["id"] if len(events) == limit else upto)
