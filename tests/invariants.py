"""The four guarantees, checked against the database's committed state."""

from django.conf import settings
from django.db.models import Count, F, FilteredRelation, Q

from support.models import Ticket, TicketAssignment, TicketEvent


def invariant_violations() -> list[str]:
    """Every way the committed data breaks a guarantee; empty when all hold."""
    problems = []
    doubled = (
        TicketAssignment.objects.filter(is_active=True)
        .values("ticket_id")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
    )
    problems += [f"ticket {row['ticket_id']} has {row['n']} active assignments" for row in doubled]

    cap = settings.SUPPORT_AGENT_MAX_TICKETS
    over = (
        TicketAssignment.objects.filter(is_active=True, ticket__status="assigned")
        .values("agent_id")
        .annotate(n=Count("id"))
        .filter(n__gt=cap)
    )
    problems += [f"agent {row['agent_id']} holds {row['n']} > {cap}" for row in over]

    open_held = Ticket.objects.filter(status="open", assignments__is_active=True).distinct()
    problems += [
        f"open ticket {pk} has an active assignment"
        for pk in open_held.values_list("pk", flat=True)
    ]
    unheld = Ticket.objects.exclude(status="open").exclude(assignments__is_active=True)
    problems += [
        f"ticket {pk} is {status} without an active assignment"
        for pk, status in unheld.values_list("pk", "status")
    ]
    # the cap's index reads TicketAssignment.holding: it must mirror the ticket's status
    for pk, ticket_id, active, holding, status in TicketAssignment.objects.values_list(
        "pk", "ticket_id", "is_active", "holding", "ticket__status"
    ):
        if holding != (active and status == "assigned"):
            problems.append(
                f"assignment {pk} of ticket {ticket_id} ({status}, active={active}) "
                f"has holding={holding}"
            )
    return problems + history_violations()


def history_violations() -> list[str]:
    """Replaying each ticket's events must give its current status and holder: a change that
    left no event (or an event without its change) shows up here."""
    born = {"status": "open", "assigned_to": None}  # every ticket starts in the pool
    replay: dict[int, dict] = {}
    for event in TicketEvent.objects.order_by("id").values("ticket_id", "changes"):
        state = replay.setdefault(event["ticket_id"], dict(born))
        for field in ("status", "assigned_to"):
            if field in event["changes"]:
                state[field] = event["changes"][field][1]
    problems = []
    for row in Ticket.objects.annotate(
        active=FilteredRelation("assignments", condition=Q(assignments__is_active=True))
    ).values("id", "status", holder=F("active__agent_id")):
        expected = replay.get(row["id"], born)
        actual = {"status": row["status"], "assigned_to": row["holder"]}
        if expected != actual:
            problems.append(f"ticket {row['id']} is {actual}, its history says {expected}")
    return problems


def held_ticket_ids(agent_id: int) -> set[int]:
    """The tickets the agent holds in status assigned, per the committed data."""
    return set(
        TicketAssignment.objects.filter(
            agent_id=agent_id, is_active=True, ticket__status="assigned"
        ).values_list("ticket_id", flat=True)
    )


def assert_invariants() -> None:
    problems = invariant_violations()
    assert not problems, problems
