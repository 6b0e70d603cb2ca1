"""The four guarantees, checked against the database's committed state."""

from django.conf import settings
from django.db.models import Count, F, FilteredRelation, Q

from support.models import Ticket, TicketAssignment, TicketEvent
from support.rules import STATUSES
from support.services import status_count


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
        Ticket.objects.filter(status="assigned")
        .values("assigned_to_id")
        .annotate(n=Count("id"))
        .filter(n__gt=cap)
    )
    problems += [f"agent {row['assigned_to_id']} holds {row['n']} > {cap}" for row in over]

    # the holder on the ticket (what every read uses) and its active assignment (the record)
    # name the same agent, or neither exists
    for row in Ticket.objects.annotate(
        active=FilteredRelation("assignments", condition=Q(assignments__is_active=True))
    ).values("id", "status", "assigned_to_id", recorded=F("active__agent_id")):
        if row["assigned_to_id"] != row["recorded"]:
            problems.append(
                f"ticket {row['id']} ({row['status']}) is held by {row['assigned_to_id']}, "
                f"its active assignment names {row['recorded']}"
            )
        if (row["status"] == "open") != (row["assigned_to_id"] is None):
            problems.append(f"ticket {row['id']} is {row['status']} with {row['assigned_to_id']}")
    return problems + history_violations() + version_violations() + count_violations()


def count_violations() -> list[str]:
    """The ticket counters (PostgreSQL's sharded counters; COUNT(*) on SQLite) agree with the
    tickets, per status and in total."""
    counted = dict(Ticket.objects.values_list("status").annotate(n=Count("id")).order_by())
    problems = []
    for status in STATUSES:
        kept, real = status_count([status]), counted.get(status, 0)
        if kept != real:
            problems.append(f"{status}: the counters say {kept}, the tickets {real}")
    kept, real = status_count(), sum(counted.values())
    if kept != real:
        problems.append(f"in all: the counters say {kept}, there are {real}")
    return problems


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
    for row in Ticket.objects.values("id", "status", holder=F("assigned_to_id")):
        expected = replay.get(row["id"], born)
        actual = {"status": row["status"], "assigned_to": row["holder"]}
        if expected != actual:
            problems.append(f"ticket {row['id']} is {actual}, its history says {expected}")
    return problems


def version_violations() -> list[str]:
    """Every write of a ticket adds one to its version and leaves one event: a ticket is at
    version 1 plus its events after ``created`` (a write that skipped the version, or counted
    twice, shows up here)."""
    events = dict(
        TicketEvent.objects.exclude(kind=TicketEvent.Kind.CREATED)
        .values_list("ticket_id")
        .annotate(n=Count("id"))
        .order_by()
    )
    return [
        f"ticket {pk} is at version {version} after {events.get(pk, 0)} changes"
        for pk, version in Ticket.objects.values_list("id", "version")
        if version != 1 + events.get(pk, 0)
    ]


def held_ticket_ids(agent_id: int) -> set[int]:
    """The tickets the agent holds in status assigned, per the committed data."""
    return set(
        Ticket.objects.filter(assigned_to_id=agent_id, status="assigned").values_list(
            "pk", flat=True
        )
    )


def assert_invariants() -> None:
    problems = invariant_violations()
    assert not problems, problems
