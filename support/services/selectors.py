"""Reads: tickets as the API shows them, what an agent holds, agents with their load, the admin
list's counts and pages.

No locks and no writes. The holder is on the ticket row, so every read of a ticket with its
holder is one table; "what an agent holds" is one statement on ``ticket_held_idx``, whatever
the cap and however many tickets the agent has resolved or closed.
"""

from collections.abc import Collection
from datetime import datetime

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import connection
from django.db.models import Count, Exists, F, OuterRef, QuerySet, Subquery
from django.db.models.fields.tuple_lookups import TupleGreaterThan, TupleLessThan
from django.db.models.functions import Coalesce

from support.models import Ticket, TicketEvent
from support.prepared import Prepared
from support.rules import STATUSES, Status
from support.services.errors import NO_AGENT, NO_TICKET, NotFound

User = get_user_model()

# A ticket as the services hand it to the API: its columns under the API's names.
ROW_FIELDS = (
    "id",
    "title",
    "description",
    "status",
    "priority",
    "created_by_id",
    "created_at",
    "updated_at",
    "assigned_to_id",
    "assigned_at",
    "version",
)


def ticket_rows(queryset: QuerySet) -> QuerySet:
    """Rows (dicts) of the tickets in ``queryset``."""
    return queryset.values(*ROW_FIELDS)


def _tuples(queryset: QuerySet) -> QuerySet:
    return queryset.values_list(*ROW_FIELDS)


def as_rows(tuples) -> list[dict]:
    return [dict(zip(ROW_FIELDS, row, strict=True)) for row in tuples]


def held_query(agent_id: int) -> QuerySet:
    """The tickets the agent holds in status assigned (its cap's count), in answer order."""
    return Ticket.objects.filter(assigned_to_id=agent_id, status=Status.ASSIGNED).order_by(
        "assigned_at", "id"
    )


# Compiled once per process: the poll of an agent at the cap is this statement alone.
_HELD = Prepared(lambda agent_id: _tuples(held_query(agent_id)), agent_id=int)


def held_tickets(agent_id: int) -> list[dict]:
    return as_rows(_HELD.rows(agent_id=agent_id))


def ticket_row(ticket_id: int) -> dict:
    row = ticket_rows(Ticket.objects.filter(pk=ticket_id)).first()
    if row is None:
        raise NotFound(NO_TICKET)
    return row


def ticket_holder(ticket_id: int) -> int | None:
    """The ticket's agent (None: in the pool). NotFound when there is no such ticket."""
    return ticket_head(ticket_id)[0]


def ticket_head(ticket_id: int) -> tuple[int | None, int]:
    """The ticket's agent (None: in the pool) and version. NotFound when there is no such
    ticket: the API asks this before it reads an edit's body, so an unknown ticket is 404 (and
    a stale If-Match 412) whatever the body says, and hands the holder to ticket_update as its
    first read."""
    found = list(Ticket.objects.filter(pk=ticket_id).values_list("assigned_to_id", "version"))
    if not found:
        raise NotFound(NO_TICKET)
    return found[0]


def agent_holds(*, agent_id: int, ticket_id: int) -> bool:
    """Whether the ticket is the agent's (in any status): an agent's move on any other
    ticket, existing or not, is NotFound alike."""
    return Ticket.objects.filter(pk=ticket_id, assigned_to_id=agent_id).exists()


def newest_tickets(start: int, size: int) -> list[dict]:
    """A page of the admin list without filters, newest first (count them with
    ``status_count()``). The common case, a dashboard's first page, runs a statement
    compiled once per page size."""
    if start == 0:
        prepared = _FIRST_PAGES.get(size)
        if prepared is None:
            prepared = _FIRST_PAGES.setdefault(size, Prepared(lambda: _newest()[:size]))
        return as_rows(prepared.rows())
    return as_rows(_newest()[start : start + size])


def _newest() -> QuerySet:
    return _tuples(Ticket.objects.order_by("-created_at", "-id"))


_FIRST_PAGES: dict[int, Prepared] = {}  # by page size (at most 100 sizes)


# --- The admin list: its count and its pages --------------------------------------------------
def status_count(statuses: Collection[str] = ()) -> int:
    """How many tickets are in ``statuses`` (none given: all tickets), exactly.

    On PostgreSQL, the sum of the ticket counters (migration 0009): 32 rows, however many
    tickets, kept by the ticket table's triggers in the same transaction as every write, so the
    sum is as exact as COUNT(*) in the same snapshot. On SQLite, COUNT(*).
    """
    chosen = [s for s in STATUSES if s in statuses] if statuses else list(STATUSES)
    if connection.vendor != "postgresql":
        tickets = Ticket.objects.all()
        return tickets.filter(status__in=chosen).count() if statuses else tickets.count()
    total = " + ".join(chosen)  # column names of support.rules, never the request's text
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT COALESCE(SUM({total}), 0)::bigint FROM support_ticket_count")  # noqa: S608
        return cursor.fetchone()[0]


def list_count(
    queryset: QuerySet | None = None, *, statuses: Collection[str] = (), narrowed: bool = False
) -> tuple[int, bool]:
    """The admin list's count and whether it is exact: ``(count, exact)``.

    No filter, or statuses only (``narrowed`` false): the counters, exact. Any other filter
    (``narrowed``): a count of at most SUPPORT_LIST_COUNT_LIMIT + 1 matching tickets, so a
    broad filter on a large table costs a bounded read, not a count of every match; past the
    limit the answer is the limit, not exact.
    """
    if not narrowed:
        return status_count(statuses), True
    bound = settings.SUPPORT_LIST_COUNT_LIMIT
    found = queryset.order_by().values("pk")[: bound + 1].count()
    return (bound, False) if found > bound else (found, True)


def ticket_page(queryset: QuerySet, start: int, size: int) -> list[dict]:
    """Up to ``size`` rows of ``queryset`` (ordered) from ``start``."""
    return list(ticket_rows(queryset)[start : start + size])


def keyset_page(
    queryset: QuerySet, position: tuple[datetime, int] | None, size: int, *, newer: bool
) -> tuple[list[dict], bool]:
    """A page of ``queryset`` in the list's default order (newest first) next to ``position``,
    a ticket's ``(created_at, id)``: the ``size`` older ones (None: from the newest), or with
    ``newer`` the ``size`` newer ones. Returns the rows, newest first, and whether more lie
    beyond them in that direction.

    A row comparison, ``(created_at, id) < (x, y)``, which ticket_newest_idx serves as a range:
    the page costs its own rows wherever it is. (DRF's CursorPagination breaks ties of its
    first ordering field by an OFFSET, which reads every ticket sharing a timestamp, as bulk
    loaded tickets do.)
    """
    columns = (F("created_at"), F("id"))
    if newer:
        queryset = queryset.filter(TupleGreaterThan(columns, position))
        queryset = queryset.order_by("created_at", "id")
    else:
        if position is not None:
            queryset = queryset.filter(TupleLessThan(columns, position))
        queryset = queryset.order_by("-created_at", "-id")
    rows = list(ticket_rows(queryset)[: size + 1])
    more = len(rows) > size
    rows = rows[:size]
    if newer:
        rows.reverse()
    return rows, more


def agents_group() -> Group:
    group, _ = Group.objects.get_or_create(name=settings.SUPPORT_AGENTS_GROUP)
    return group


def is_agent_expr(user_ref: str = "pk"):
    """True when the user the outer row names (by ``user_ref``) is in the agents group."""
    return Exists(
        User.groups.through.objects.filter(
            user_id=OuterRef(user_ref), group__name=settings.SUPPORT_AGENTS_GROUP
        )
    )


def held_count(user_ref: str = "pk"):
    """How many tickets the user the outer row names holds in status assigned (a count on
    ticket_held_idx)."""
    held = (
        Ticket.objects.filter(assigned_to_id=OuterRef(user_ref), status=Status.ASSIGNED)
        .order_by()
        .values("assigned_to_id")
        .annotate(n=Count("pk"))
        .values("n")
    )
    return Coalesce(Subquery(held), 0)


def count_held(agent_id: int) -> int:
    return held_query(agent_id).count()


def agents_with_load() -> QuerySet:
    """Every agent (active or not) with how many tickets it holds in status assigned."""
    return (
        User.objects.filter(groups__name=settings.SUPPORT_AGENTS_GROUP)
        .annotate(assigned_count=held_count())
        .order_by("pk")
        .values("id", "username", "email", "is_active", "assigned_count")
    )


def agent_row(agent_id: int) -> dict:
    """An agent (active or not) as the API shows it; NotFound for anyone else."""
    row = agents_with_load().filter(pk=agent_id).first()
    if row is None:
        raise NotFound(NO_AGENT)
    return row


def agent_name(agent_id: int) -> str:
    """An agent as people know it, by username (forms list agents by name), with its id."""
    username = User.objects.filter(pk=agent_id).values_list("username", flat=True).first()
    return f"{username} (id {agent_id})" if username is not None else f"#{agent_id}"


def ticket_history(ticket_id: int) -> QuerySet:
    """A ticket's events, oldest first (they outlive a deleted ticket)."""
    return (
        TicketEvent.objects.filter(ticket_id=ticket_id)
        .order_by("id")
        .values("id", "at", "actor_id", "kind", "from_status", "to_status", "agent_id", "changes")
    )
