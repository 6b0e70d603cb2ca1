"""The locks every change takes, and the order it takes them in.

Lock contract (PostgreSQL; on SQLite every write transaction is ``BEGIN IMMEDIATE`` and so
runs alone, and the row locks below are no-ops):

- An agent's user row is the mutex for the set of tickets that agent holds. Every change that
  adds a ticket to, or takes one from, an agent's held set locks that row first
  (``FOR NO KEY UPDATE``, which does not block foreign-key checks of other inserts).
- Agent rows are locked before ticket rows, several agents in id order. Nobody waits for an
  agent row while holding a ticket lock, so no deadlock cycle can form.
- A ticket is locked by one statement that also reads it, holder included (the holder is a
  column of the row, so a read that waited for the lock sees the committed holder).
- Pool tickets are taken with ``FOR NO KEY UPDATE SKIP LOCKED``: an agent never waits for a
  ticket another agent is taking; it takes the next one.
- A decision is made only on values read after the locks are held. A user's role (another
  table) is read by a statement of its own after the lock (``lock_users``).
- An agent's poll at the cap takes no lock: it changes nothing, and only a change (which
  locks) can take the agent past the cap.
- The idle sweep (support.services.idle_release) first tries a transaction-level advisory lock
  (one sweep at a time; it never waits for it), then locks the silent agents' rows with SKIP
  LOCKED (it never waits for an agent: a locked one is busy, and looked at by the next sweep),
  then all their assigned tickets in one statement, before any write. Presence rows
  (support.presence) are outside this contract: only a flush locks them, for one statement,
  in agent order.
- A POST with an Idempotency-Key (support.api.idempotency) wraps its service in a transaction
  that first *tries* an advisory lock on (user, key), never waiting for it (held: 409), and
  writes the key's row after the service's work, a new row whose unique index waits for
  nobody (another request of the same key would hold the advisory lock). Its service's own
  transaction becomes a savepoint; its locks are taken in the order above and held to the
  outer commit, which follows at once.
- A version check (If-Match) reads the ticket's version from the locked row, like every
  decision.
- The ticket counters (migration 0009) are the last lock. A ticket write that moves tickets
  between statuses adds to its session's counter row (``pg_backend_pid() % 32``) in the
  statement's own trigger: the lock is taken by the write itself, after every lock above, and
  held to the commit. A session has one row, so a transaction locks at most one: no deadlock
  among counters. Nothing waits for another lock after it: in every service the ticket write
  is the last statement that can wait (an agent's tokens are deleted before its tickets are
  released; the events and assignments written after it are new rows). At the commit the
  foreign-key checks (deferred, as Django makes them) take FOR KEY SHARE on the users and
  tickets those rows name: the agents and tickets the transaction has locked already (no
  wait), and the acting admin's row, which waits only while another transaction deletes that
  user or changes its username (the admin site's user page, which saves the user before its
  service call writes tickets).
"""

import time
from collections.abc import Iterable
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import QuerySet

from support import observability as obs
from support.models import Ticket
from support.prepared import Prepared
from support.services.errors import AgentInactive, NotAnAgent
from support.services.selectors import ROW_FIELDS, as_rows

User = get_user_model()


@dataclass(frozen=True)
class LockedUser:
    id: int
    is_active: bool
    is_agent: bool

    @property
    def active_agent(self) -> bool:
        return self.is_active and self.is_agent


def _lock_users_query(ids: list[int]) -> QuerySet:
    return (
        User.objects.select_for_update(no_key=True)
        .filter(pk__in=ids)
        .order_by("pk")
        .values_list("pk", "is_active")
    )


def _agents_query(ids: list[int]) -> QuerySet:
    return User.groups.through.objects.filter(
        user_id__in=ids, group__name=settings.SUPPORT_AGENTS_GROUP
    ).values_list("user_id")


# Every agent change locks one user row: compiled once per process.
_LOCK_ONE_USER = Prepared(lambda pk: _lock_users_query([pk]), pk=int)
_AGENT_ONE = Prepared(lambda pk: _agents_query([pk]), pk=int)


def lock_users(user_ids: Iterable[int | None]) -> dict[int, LockedUser]:
    """Lock the given users' rows (None ignored), in id order, and read them after the lock.

    Two statements: the lock, which reads the locked row as it is after any wait (PostgreSQL
    reads a row it waited for again), then the role. The role is in another table, which the
    locking statement would read as of its start, before the wait: an agent demoted by the
    transaction that held its row would still look like one.
    """
    ids = sorted({pk for pk in user_ids if pk is not None})
    if not ids:
        return {}
    started = time.perf_counter()
    if len(ids) == 1:
        rows = _LOCK_ONE_USER.rows(pk=ids[0])
        obs.AGENT_LOCK_WAIT.observe(time.perf_counter() - started)
        agents = {pk for (pk,) in _AGENT_ONE.rows(pk=ids[0])} if rows else set()
    else:
        rows = list(_lock_users_query(ids))
        obs.AGENT_LOCK_WAIT.observe(time.perf_counter() - started)
        agents = set(_agents_query(ids).values_list("user_id", flat=True))
    return {pk: LockedUser(pk, active, pk in agents) for pk, active in rows}


def require_active_agent(locked: dict[int, LockedUser], agent_id: int) -> None:
    """The caller (an agent) is still one, read under its row lock."""
    user = locked.get(agent_id)
    if user is None or not user.is_active:
        raise AgentInactive("User inactive or deleted.")
    if not user.is_agent:
        raise NotAnAgent("You do not have permission to perform this action.")


_LOCK_TICKET = Prepared(
    lambda pk: Ticket.objects.select_for_update(no_key=True).filter(pk=pk).values_list(*ROW_FIELDS),
    pk=int,
)


def lock_ticket(ticket_id: int) -> dict | None:
    """Lock one ticket's row and read it, holder included; None when it does not exist."""
    rows = as_rows(_LOCK_TICKET.rows(pk=ticket_id))
    return rows[0] if rows else None
