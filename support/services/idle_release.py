"""The idle release: the assigned tickets of an agent silent too long go back to the pool.

An agent is silent since the later of its last recorded presence (support.presence) and its
latest assignment it still holds. So an agent with no presence record (given tickets by an
admin before it ever made a request) is silent since its latest assignment, and an admin who
gives a ticket to an agent that had gone quiet gives it the whole limit to notice. Silent for
longer than the limit (``SUPPORT_AGENT_IDLE_RELEASE_SECONDS``): each of its ``assigned`` tickets
goes back to the pool with a ``released`` event whose ``changes`` say
``"reason": "agent_idle"``, the agent as actor and as the event's agent. Its resolved and
closed tickets keep it, the record of who worked them. The presence record lags a request by up
to one flush interval, so an agent that makes a request at least every (limit - flush interval)
seconds never loses its tickets.

One sweep at a time, across processes and hosts: a sweep's transaction starts with
``pg_try_advisory_xact_lock(SWEEP_LOCK)`` and does nothing when another transaction holds it
(that sweep is releasing the same agents). A transaction-level lock, so it is safe behind
PgBouncer in transaction pooling (a session-level one would stay on a server connection that
the next client gets) and ends with its transaction, however that ends. On SQLite there is no
advisory lock, and none is needed: the transaction begins IMMEDIATE, so sweeps (like every
write) run one at a time, and the second sees what the first released.

Locks, after that one (support.services.locks): the silent agents' rows, in id order, with
SKIP LOCKED (an agent whose row is locked is being changed right now, most likely by its own
request; the next sweep looks at it again, so a sweep never waits for an agent); then their
assigned tickets, in one statement; silence is judged again on what is read under those locks.
Then the writes, whose counter row is the last lock. The released tickets enter the pool, which
wakes the agents waiting for work (NOTIFY support_pool, migration 0011).
"""

from dataclasses import dataclass
from datetime import timedelta

from django.db import connection, transaction
from django.db.models import Exists, Max, OuterRef
from django.utils import timezone

from support import observability as obs
from support.models import AgentPresence, Ticket, TicketEvent
from support.rules import Status
from support.services.records import move_tickets
from support.services.selectors import User

# The sweep's advisory lock: "SUPPORT" in ASCII, then 1. pg_locks shows it as locktype
# 'advisory' with classid 1398100048 and objid 1330795521.
SWEEP_LOCK = 0x53555050_4F525401


@dataclass(frozen=True)
class Sweep:
    ran: bool  # False: another sweep held the lock; this one did nothing
    released: dict[int, list[int]]  # agent id -> the ticket ids it lost, both ascending


def idle_agents_release(*, idle_seconds: float) -> Sweep:
    """Release the assigned tickets of every agent silent for more than ``idle_seconds``.

    One transaction (see the module's docstring for the locks). Returns what it released, or
    ``ran=False`` when another sweep holds the advisory lock.
    """
    now = timezone.now()
    cutoff = now - timedelta(seconds=idle_seconds)
    with transaction.atomic():
        if not _take_sweep_lock():
            return Sweep(ran=False, released={})
        candidates = _silent_agents(cutoff)
        if not candidates:
            return Sweep(ran=True, released={})
        agents = list(
            User.objects.select_for_update(no_key=True, skip_locked=True)
            .filter(pk__in=candidates)
            .order_by("pk")
            .values_list("pk", flat=True)
        )
        held: dict[int, list[tuple[int, object]]] = {}
        for ticket_id, agent_id, assigned_at in (
            Ticket.objects.select_for_update(no_key=True)
            .filter(assigned_to_id__in=agents, status=Status.ASSIGNED)
            .order_by("pk")
            .values_list("pk", "assigned_to_id", "assigned_at")
        ):
            held.setdefault(agent_id, []).append((ticket_id, assigned_at))
        present = set(
            AgentPresence.objects.filter(agent_id__in=agents, last_seen__gte=cutoff).values_list(
                "agent_id", flat=True
            )
        )
        released = {}
        for agent_id, tickets in sorted(held.items()):
            if agent_id in present or max(at for _, at in tickets) >= cutoff:
                continue  # seen, or given a ticket, since the candidates were read
            ids = [ticket_id for ticket_id, _ in tickets]
            move_tickets(
                ids,
                kind=TicketEvent.Kind.RELEASED,
                actor_id=agent_id,
                agent_id=agent_id,
                from_status=Status.ASSIGNED,
                to_status=Status.OPEN,
                holder=agent_id,
                new_holder=None,
                at=now,
                reason=TicketEvent.Reason.AGENT_IDLE,
            )
            released[agent_id] = ids
        if released:
            transaction.on_commit(lambda: _released(released, idle_seconds))
        return Sweep(ran=True, released=released)


def _take_sweep_lock() -> bool:
    """The sweep's advisory lock, until the transaction ends; False when another has it."""
    if connection.vendor != "postgresql":
        return True  # SQLite: the transaction's IMMEDIATE write lock serializes sweeps
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [SWEEP_LOCK])
        return cursor.fetchone()[0]


def _silent_agents(cutoff) -> list[int]:
    """Agents holding assigned tickets, not seen since ``cutoff`` and given none since: read
    without locks (the caller judges again under them). One statement over the held-tickets
    index, whose size is bounded by the number of agents times the cap."""
    return list(
        Ticket.objects.filter(status=Status.ASSIGNED)
        .exclude(
            Exists(
                AgentPresence.objects.filter(
                    agent_id=OuterRef("assigned_to_id"), last_seen__gte=cutoff
                )
            )
        )
        .values("assigned_to_id")
        .annotate(latest=Max("assigned_at"))
        .filter(latest__lt=cutoff)
        .order_by("assigned_to_id")
        .values_list("assigned_to_id", flat=True)
    )


def _released(released: dict[int, list[int]], idle_seconds: float) -> None:
    for agent_id, ids in released.items():
        obs.IDLE_RELEASED.inc(len(ids))
        obs.log_event(
            "tickets released: agent idle",
            agent_id=agent_id,
            ticket_ids=ids,
            idle_seconds=idle_seconds,
        )
