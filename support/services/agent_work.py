"""The agent's work: the fetch that tops it up from the pool, its moves, its hand-backs, and
releases.

Locks (support.services.locks): the agent's row, then its tickets; pool tickets with SKIP
LOCKED. A fetch at the cap locks nothing.
"""

from django.db import transaction
from django.utils import timezone

from support import observability as obs
from support import rules
from support.models import Ticket, TicketEvent
from support.rules import Actor, Status
from support.services.errors import NOT_YOURS, NotFound, TransitionNotAllowed, check_version
from support.services.locks import lock_ticket, lock_users, require_active_agent
from support.services.records import move_tickets
from support.services.selectors import ROW_FIELDS, held_tickets

Kind = TicketEvent.Kind

# The moves these functions make, as support.rules gives them.
_FETCH = rules.move(Status.OPEN, Status.ASSIGNED)
_RELEASE = rules.move(Status.ASSIGNED, Status.OPEN)
if not (Actor.FETCH in _FETCH.by and {Actor.RELEASE, Actor.HAND_BACK} <= _RELEASE.by):
    raise RuntimeError("support.rules no longer gives the fetch, release or hand-back its move")


def tickets_top_up(*, agent_id: int, role_checked: bool = False) -> list[dict]:
    """Top the agent up to the cap from the pool and return what it holds.

    ``role_checked=True`` says the caller has just read the agent's role and active flag (the
    token check of the same request): an agent already at the cap is then answered from one
    plain read, without the transaction below (one statement: it sees one moment's held set).

    One transaction: lock the agent's row (its own concurrent calls queue here), read what it
    holds, take the missing number of open tickets with ``FOR NO KEY UPDATE SKIP LOCKED`` in
    pick order (priority, then created_at, then id), give them to the agent. Returns the held
    tickets as rows, ordered by assigned_at then id. Raises AgentInactive / NotAnAgent if the
    caller lost its role.
    """
    cap = rules.cap()
    if role_checked:
        held = held_tickets(agent_id)
        if len(held) >= cap:
            return held
    with transaction.atomic():
        require_active_agent(lock_users([agent_id]), agent_id)
        held = held_tickets(agent_id)
        missing = cap - len(held)
        if missing <= 0:
            return held
        picked = list(
            Ticket.objects.select_for_update(skip_locked=True, no_key=True)
            .filter(status=Status.OPEN)
            .order_by("-priority", "created_at", "id")
            .values(*ROW_FIELDS)[:missing]
        )
        if not picked:
            transaction.on_commit(lambda: _pool_was_empty(agent_id, missing))
            return held
        now = timezone.now()
        ids = [row["id"] for row in picked]
        move_tickets(
            ids,
            kind=Kind.ASSIGNED,
            actor_id=agent_id,
            agent_id=agent_id,
            from_status=Status.OPEN,
            to_status=Status.ASSIGNED,
            holder=None,
            new_holder=agent_id,
            at=now,
        )
        for row in picked:
            row.update(
                status=Status.ASSIGNED,
                updated_at=now,
                assigned_to_id=agent_id,
                assigned_at=now,
                version=row["version"] + 1,
            )
        transaction.on_commit(lambda: _topped_up(agent_id, ids))
        held.extend(picked)
        held.sort(key=lambda row: (row["assigned_at"], row["id"]))
        return held


def _topped_up(agent_id: int, ids: list[int]) -> None:
    obs.TOPUP_ASSIGNED.observe(len(ids))
    obs.log_event("tickets assigned by fetch", agent_id=agent_id, ticket_ids=ids)


def _pool_was_empty(agent_id: int, missing: int) -> None:
    obs.TOPUP_POOL_EMPTY.inc()
    obs.log_event("fetch found the pool empty", agent_id=agent_id, missing=missing)


def ticket_transition_by_agent(
    *, agent_id: int, ticket_id: int, to_status: str, versions=None
) -> dict:
    """Move a ticket the agent holds, as support.rules lets an agent.

    Raises NotFound when the ticket does not exist or is not the agent's (the two are not told
    apart), VersionMismatch when ``versions`` (If-Match) does not have the ticket's version,
    TransitionNotAllowed for a move the rules do not give an agent.
    """
    return _move_own_ticket(
        agent_id=agent_id,
        ticket_id=ticket_id,
        to_status=to_status,
        versions=versions,
        actor=Actor.AGENT,
        kind=Kind.STATUS_CHANGED,
        message=f"ticket {to_status} by agent",
    )


def ticket_release_by_agent(*, agent_id: int, ticket_id: int, versions=None) -> dict:
    """The agent hands one of its assigned tickets back to the pool (support.rules' hand-back).

    Raises NotFound when the ticket does not exist or is not the agent's (as for a move),
    VersionMismatch as a move does, TransitionNotAllowed when the agent holds it in another
    status (a resolved or closed ticket stays the record of who worked it). Returns the ticket
    as the pool now has it: open, no agent. Its event: ``released``, reason
    ``released_by_agent``, the agent as actor.
    """
    return _move_own_ticket(
        agent_id=agent_id,
        ticket_id=ticket_id,
        to_status=Status.OPEN,
        versions=versions,
        actor=Actor.HAND_BACK,
        kind=Kind.RELEASED,
        reason=TicketEvent.Reason.RELEASED_BY_AGENT,
        message="ticket handed back by agent",
    )


def _move_own_ticket(
    *,
    agent_id: int,
    ticket_id: int,
    to_status: str,
    versions,
    actor: Actor,
    kind: str,
    message: str,
    reason: str | None = None,
) -> dict:
    """Locks the agent row, then the ticket row; moves a ticket the agent holds, at one of
    ``versions`` (None: any), as support.rules lets ``actor``. The agent stays the ticket's
    agent unless the move ends the assignment (the ticket then goes back to the pool)."""
    with transaction.atomic():
        require_active_agent(lock_users([agent_id]), agent_id)
        row = lock_ticket(ticket_id)
        if row is None or row["assigned_to_id"] != agent_id:
            raise NotFound(NOT_YOURS)
        check_version(row["id"], row["version"], versions)
        current = row["status"]
        move = rules.move(current, to_status)
        if move is None or actor not in move.by:
            raise TransitionNotAllowed(current, to_status, rules.allowed(current, actor))
        now = timezone.now()
        new_holder = None if move.ends_assignment else agent_id
        move_tickets(
            [ticket_id],
            kind=kind,
            actor_id=agent_id,
            agent_id=agent_id,
            from_status=current,
            to_status=to_status,
            holder=agent_id,
            new_holder=new_holder,
            at=now,
            reason=reason,
        )
        transaction.on_commit(
            lambda: obs.log_event(message, ticket_id=ticket_id, agent_id=agent_id)
        )
        row.update(status=to_status, updated_at=now, version=row["version"] + 1)
        if new_holder is None:
            row.update(assigned_to_id=None, assigned_at=None)
        return row


def agent_release_tickets(*, agent_id: int, actor_id: int) -> list[int]:
    """Return every ticket the user holds in status assigned to the pool (for a user that is
    losing its agent role). Locks the user row, then the tickets; returns the released ids."""
    with transaction.atomic():
        lock_users([agent_id])
        return release_assigned(agent_id, actor_id)


def release_assigned(agent_id: int, actor_id: int) -> list[int]:
    """Under the agent's row lock: its assigned tickets back to the pool, with their events.
    Resolved and closed tickets keep their agent, the record of who worked them."""
    released = list(
        Ticket.objects.select_for_update(no_key=True)
        .filter(assigned_to_id=agent_id, status=Status.ASSIGNED)
        .values_list("pk", flat=True)
    )
    if not released:
        return released
    now = timezone.now()
    move_tickets(
        released,
        kind=Kind.RELEASED,
        actor_id=actor_id,
        agent_id=agent_id,
        from_status=Status.ASSIGNED,
        to_status=Status.OPEN,
        holder=agent_id,
        new_holder=None,
        at=now,
    )
    return released
