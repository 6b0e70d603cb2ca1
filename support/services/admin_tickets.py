"""An admin's tickets: create, edit (any field, any move support.rules gives an admin), delete.

Locks (support.services.locks): the ticket's current holder and the agent it is given to, in
id order, then the ticket. The holder is read before the locks (the agent rows to lock depend
on it) and again with the ticket's lock: when it changed in between, the edit starts over.
"""

from django.db import transaction
from django.utils import timezone

from support import observability as obs
from support import rules
from support.models import Ticket, TicketEvent
from support.rules import Actor, Status
from support.services.errors import (
    NO_TICKET,
    AgentAtCapacity,
    ConcurrentChange,
    Conflict,
    InvalidField,
    NotFound,
    TransitionNotAllowed,
    check_version,
)
from support.services.locks import LockedUser, lock_ticket, lock_users
from support.services.records import change_tickets, record
from support.services.selectors import ROW_FIELDS, agent_name, count_held, ticket_holder

Kind = TicketEvent.Kind

# How many times an edit starts over when the ticket's holder changed between the unlocked
# read and the locked one (a concurrent fetch or edit); each try is short.
EDIT_TRIES = 5


def ticket_create(*, title: str, description: str, priority: int, created_by_id: int) -> dict:
    with transaction.atomic():
        ticket = Ticket.objects.create(
            title=title, description=description, priority=priority, created_by_id=created_by_id
        )
        record(
            [ticket.pk],
            kind=Kind.CREATED,
            actor_id=created_by_id,
            at=ticket.created_at,
            to_status=Status.OPEN,
            changes={
                "title": [None, title],
                "description": [None, description],
                "priority": [None, Ticket.Priority(priority).label],
            },
        )
    return {name: getattr(ticket, name) for name in ROW_FIELDS}  # open, in the pool


_UNREAD = object()


def ticket_update(
    *, ticket_id: int, changes: dict, actor_id: int, holder=_UNREAD, versions=None
) -> dict:
    """Apply an admin's edit: any of title, description, priority, status, assigned_to.

    ``assigned_to`` present and None means "no agent". ``holder``: what ``ticket_holder``
    answered just before, if the caller asked it. ``versions``: the ticket versions the edit
    applies to (If-Match; None: any), compared under the ticket's lock. Raises
    VersionMismatch when the ticket is at another version, InvalidField when ``assigned_to``
    is not an active agent, Conflict when the result would break a rule, and AgentAtCapacity
    when the agent already holds the cap in status assigned.
    """
    for _ in range(EDIT_TRIES):
        if holder is _UNREAD:
            holder = ticket_holder(ticket_id)
        wanted = changes.get("assigned_to", holder)
        with transaction.atomic():
            locked = lock_users([holder, wanted])
            row = lock_ticket(ticket_id)
            if row is None:
                raise NotFound(NO_TICKET)
            if row["assigned_to_id"] != holder:
                holder = _UNREAD  # a concurrent change moved the ticket: read it again
                continue
            check_version(row["id"], row["version"], versions)
            return _apply_edit(row, changes, locked, actor_id)
    raise ConcurrentChange("The ticket kept changing while it was being edited; try again.")


def _target(row: dict, changes: dict) -> tuple[str, int | None]:
    """The status and agent the edit asks for, the unsaid one following from the other."""
    holder, current = row["assigned_to_id"], row["status"]
    status = changes.get("status")
    if "assigned_to" in changes:
        agent = changes["assigned_to"]
        if status is None:
            if agent is None:
                status = Status.OPEN
            else:
                status = Status.ASSIGNED if current == Status.OPEN else current
    else:
        status = status or current
        agent = holder if rules.has_agent(status) else None
    return status, agent


def _apply_edit(row: dict, changes: dict, locked: dict[int, LockedUser], actor_id: int) -> dict:
    holder, current = row["assigned_to_id"], row["status"]
    status, agent = _target(row, changes)
    named = "assigned_to" in changes and agent is not None and agent != holder
    if named and (agent not in locked or not locked[agent].active_agent):
        raise InvalidField("assigned_to", f"User {agent} is not an active agent.")
    if status != current:
        move = rules.move(current, status)
        if move is None or Actor.ADMIN not in move.by:
            raise TransitionNotAllowed(current, status, rules.allowed(current, Actor.ADMIN))
    if not rules.has_agent(status) and agent is not None:
        raise Conflict(
            "An open ticket has no agent: leave assigned_to out or set it to null, "
            "or choose another status."
        )
    if rules.has_agent(status) and agent is None:
        raise Conflict(f"A ticket in status '{status}' needs an agent: give assigned_to.")
    gains = rules.counts_toward_cap(status) and not (
        rules.counts_toward_cap(current) and agent == holder
    )
    if gains:
        if agent not in locked or not locked[agent].active_agent:
            raise Conflict(f"User {agent} is no longer an active agent; assign someone else.")
        if count_held(agent) >= rules.cap():
            obs.CAP_REFUSALS.inc()
            obs.log_event("assignment refused at the cap", agent_id=agent, ticket_id=row["id"])
            raise AgentAtCapacity(
                f"Agent {agent_name(agent)} already holds {rules.cap()} assigned tickets (the cap)."
            )

    fields = {n: changes[n] for n in ("title", "description", "priority") if n in changes}
    diff = {name: [row[name], value] for name, value in fields.items() if row[name] != value}
    if status != current:
        diff["status"] = [current, status]
    if agent != holder:
        diff["assigned_to"] = [holder, agent]
    if not diff:
        return row

    now = timezone.now()
    ticket_id = row["id"]
    change_tickets(
        [ticket_id], status=status, holder=holder, new_holder=agent, at=now, fields=fields
    )
    kind = _event_kind(diff)
    if "priority" in diff:
        diff["priority"] = [Ticket.Priority(rank).label for rank in diff["priority"]]
    record(
        [ticket_id],
        kind=kind,
        actor_id=actor_id,
        at=now,
        from_status=current,
        to_status=status,
        agent_id=agent or holder,
        changes=diff,
    )
    transaction.on_commit(
        lambda: obs.log_event(
            f"ticket {kind} by admin", ticket_id=ticket_id, actor_id=actor_id, changes=diff
        )
    )
    row.update(fields, status=status, updated_at=now, version=row["version"] + 1)
    if agent != holder:
        row.update(assigned_to_id=agent, assigned_at=now if agent is not None else None)
    return row


def _event_kind(diff: dict) -> str:
    """The one word for an edit, most telling first: where the ticket went, then its status."""
    if "assigned_to" in diff:
        old, new = diff["assigned_to"]
        if new is None:
            return Kind.RELEASED
        return Kind.ASSIGNED if old is None else Kind.REASSIGNED
    if "status" in diff:
        return Kind.STATUS_CHANGED
    return Kind.EDITED


def ticket_delete(*, ticket_id: int, actor_id: int, versions=None) -> None:
    """Delete a ticket and its assignments, locking its holder first like any other change;
    only at one of ``versions`` when given (If-Match), else VersionMismatch."""
    for _ in range(EDIT_TRIES):
        holder = ticket_holder(ticket_id)
        with transaction.atomic():
            lock_users([holder])
            row = lock_ticket(ticket_id)
            if row is None:
                raise NotFound(NO_TICKET)
            if row["assigned_to_id"] != holder:
                continue
            check_version(row["id"], row["version"], versions)
            Ticket.objects.filter(pk=ticket_id).delete()
            record(
                [ticket_id],
                kind=Kind.DELETED,
                actor_id=actor_id,
                at=timezone.now(),
                from_status=row["status"],
                agent_id=holder,
            )
            return
    raise ConcurrentChange("The ticket kept changing while it was being deleted; try again.")
