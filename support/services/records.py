"""The one writer of a ticket's status and holder, and of the history of both.

The holder is stored twice: on the ticket row (``assigned_to``/``assigned_at``, what every
read uses) and as the ticket's active assignment (the record of who held it, and when).
:func:`change_tickets` is the only code that writes either, for every change: a fetch, an
agent's move, an admin's edit, a release. It writes status and holder in one UPDATE (the
database's CHECK wants them together) and ends and starts assignments in the same
transaction. :func:`record` writes the change's events; :func:`move_tickets` does both for
a change of status and holder alone (a fetch, an agent's move, a release). Every write
of a ticket row adds one to its ``version`` (the API's ETag).
"""

from collections.abc import Iterable
from datetime import datetime

from django.db.models import F

from support.models import Ticket, TicketAssignment, TicketEvent


def change_tickets(
    ids: list[int],
    *,
    status: str,
    holder: int | None,
    new_holder: int | None,
    at: datetime,
    fields: dict | None = None,
) -> None:
    """Give the tickets ``ids`` (all held by ``holder``, locked by the caller) ``status`` and
    ``new_holder``, and any other ``fields``; each ticket's version goes up by one (the
    caller's locked row had the version before)."""
    values = {**(fields or {}), "status": status, "updated_at": at, "version": F("version") + 1}
    if new_holder != holder:
        values["assigned_to_id"] = new_holder
        values["assigned_at"] = at if new_holder is not None else None
        if holder is not None:
            TicketAssignment.objects.filter(ticket_id__in=ids, is_active=True).update(
                is_active=False
            )
        if new_holder is not None:
            TicketAssignment.objects.bulk_create(
                TicketAssignment(ticket_id=pk, agent_id=new_holder, assigned_at=at) for pk in ids
            )
    Ticket.objects.filter(pk__in=ids).update(**values)


def record(
    ids: Iterable[int],
    *,
    kind: str,
    actor_id: int,
    at: datetime,
    from_status: str = "",
    to_status: str = "",
    agent_id: int | None = None,
    changes: dict | None = None,
) -> None:
    """One event per ticket, the same for each.

    ``agent_id``: the ticket's agent after the change, or before it when the change took the
    ticket from its agent. The agent before, when it is another one, is read from
    ``changes["assigned_to"]`` into ``previous_agent`` (the event feed shows the event to both).

    The caller has written or locked the tickets first, in the same transaction: PostgreSQL
    then gave the transaction its id before the events draw theirs, which the event feed's
    horizon relies on (support.services.events).
    """
    changes = changes or {}
    before = changes.get("assigned_to", [None])[0]
    previous_agent_id = before if before != agent_id else None
    TicketEvent.objects.bulk_create(
        TicketEvent(
            ticket_id=pk,
            at=at,
            actor_id=actor_id,
            kind=kind,
            from_status=from_status,
            to_status=to_status,
            agent_id=agent_id,
            previous_agent_id=previous_agent_id,
            changes=changes,
        )
        for pk in ids
    )


def move_tickets(
    ids: list[int],
    *,
    kind: str,
    actor_id: int,
    agent_id: int | None,
    from_status: str,
    to_status: str,
    holder: int | None,
    new_holder: int | None,
    at: datetime,
    reason: str | None = None,
) -> None:
    """Give the tickets ``ids`` (in ``from_status``, held by ``holder``) ``to_status`` and
    ``new_holder``, with one event each saying what changed (and why: ``reason``, one of
    ``TicketEvent.Reason``, when given)."""
    change_tickets(ids, status=to_status, holder=holder, new_holder=new_holder, at=at)
    changes = {"assigned_to": [holder, new_holder]} if new_holder != holder else {}
    changes["status"] = [from_status, to_status]
    if reason is not None:
        changes["reason"] = reason
    record(
        ids,
        kind=kind,
        actor_id=actor_id,
        at=at,
        from_status=from_status,
        to_status=to_status,
        agent_id=agent_id,
        changes=changes,
    )
