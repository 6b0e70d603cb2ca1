"""Which agents are present: marked in memory on every request, written in batches.

An agent is present when it makes requests. Writing that down on each request would add a
write to every poll, so each worker process keeps a map, agent id -> time of its latest
request, and :func:`flush` writes it in one upsert (``support_agent_presence``) every
``SUPPORT_PRESENCE_FLUSH_SECONDS`` (support.housekeeping runs it): an agent costs at most one
row write per flush interval per process, whatever its request rate, and a request adds no
statement, no thread hop and no lock.

Where the mark happens: :func:`seen` is called by the token authentication
(support.api.auth.TokenAuthentication) for every request an active agent makes with a valid
token, whatever the endpoint and whatever the answer (a 403 or a 404 is still a sign of life),
in the request's one worker-thread hop, from the values the token query already read; for a
browsable-API session, by the agent permission, which reads the role. Other code that keeps an
agent's connection open without requests (a live event stream) calls :func:`seen` as well,
say once per flush interval.

The database sees a request up to one flush interval late (and a process that stops loses its
last interval's marks; the agent's next request marks it again). Hence the setting's check:
the interval is at most half the idle limit.
"""

import threading
import time
from datetime import UTC, datetime

from django.contrib.auth import get_user_model
from django.db import IntegrityError, OperationalError, connection

_lock = threading.Lock()
_marks: dict[int, float] = {}  # agent id -> time.time() of its latest request


def seen(agent_id: int, at: float | None = None) -> None:
    """Mark the agent present now (or at ``at``, a ``time.time()``). Memory only: cheap
    enough for every request, from any thread."""
    now = time.time() if at is None else at
    with _lock:
        if _marks.get(agent_id, 0.0) < now:
            _marks[agent_id] = now


def pending() -> dict[int, float]:
    """The marks not written yet (a copy)."""
    with _lock:
        return dict(_marks)


def _take() -> dict[int, float]:
    global _marks
    with _lock:
        marks, _marks = _marks, {}
    return marks


def _put_back(marks: dict[int, float]) -> None:
    for agent_id, at in marks.items():
        seen(agent_id, at)


# One statement for any number of agents. Sorted by agent, so that two processes flushing the
# same agents lock their rows in the same order (no deadlock); GREATEST, so that a flush that
# carries an older mark (another process's) never moves last_seen back; agents deleted since
# their mark are left out (their row would fail the foreign key).
_UPSERT_POSTGRESQL = """
    INSERT INTO support_agent_presence (agent_id, last_seen)
    SELECT mark.agent_id, mark.last_seen
    FROM unnest(%s::integer[], %s::timestamptz[]) AS mark(agent_id, last_seen)
    WHERE EXISTS (SELECT 1 FROM {users} AS u WHERE u.id = mark.agent_id)
    ORDER BY mark.agent_id
    ON CONFLICT (agent_id) DO UPDATE
    SET last_seen = GREATEST(support_agent_presence.last_seen, EXCLUDED.last_seen)
"""
_UPSERT_SQLITE = """
    INSERT INTO support_agent_presence (agent_id, last_seen)
    SELECT column1, column2 FROM (VALUES {values})
    WHERE column1 IN (SELECT id FROM {users})
    ON CONFLICT (agent_id) DO UPDATE SET last_seen = MAX(last_seen, excluded.last_seen)
"""
_SQLITE_ROWS_PER_STATEMENT = 400  # two parameters each, under SQLite's limit of 999


def flush() -> int:
    """Write the marks taken since the last flush, in one upsert (on SQLite, one per 400
    agents). Returns how many agents it wrote. When the database is unavailable, or a marked
    user is deleted while the upsert runs, the marks are kept for the next flush (which skips
    users gone); the error is raised either way (any other error drops them: the agents' next
    requests mark them again, and no mark can block every later flush)."""
    marks = _take()
    if not marks:
        return 0
    ids = sorted(marks)
    times = [datetime.fromtimestamp(marks[pk], UTC) for pk in ids]
    users = connection.ops.quote_name(get_user_model()._meta.db_table)
    try:
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute(_UPSERT_POSTGRESQL.format(users=users), [ids, times])
            else:
                adapt = connection.ops.adapt_datetimefield_value
                for start in range(0, len(ids), _SQLITE_ROWS_PER_STATEMENT):
                    chunk = range(start, min(start + _SQLITE_ROWS_PER_STATEMENT, len(ids)))
                    values = ", ".join("(%s, %s)" for _ in chunk)
                    params = [p for i in chunk for p in (ids[i], adapt(times[i]))]
                    cursor.execute(_UPSERT_SQLITE.format(users=users, values=values), params)
    except (OperationalError, IntegrityError):
        # the database unavailable, or a user deleted while the upsert ran (its reference
        # fails at the end): the next flush writes them all, but for the user now gone
        _put_back(marks)
        raise
    return len(ids)


def reset() -> None:
    """Forget the marks not written yet (tests)."""
    _take()
