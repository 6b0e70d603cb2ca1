"""The rules of the ticket service: the agent top-up, the state machine and the admin's edits.

Every function here that writes is plain, synchronous and runs its whole work in one
transaction; views call them from their one worker-thread hop (``support.api.views``).

Lock contract (PostgreSQL; on SQLite every write transaction is ``BEGIN IMMEDIATE`` and so runs
alone, and the row locks below are no-ops):

- An agent's user row is the mutex for the set of tickets that agent holds. Every change that
  adds a ticket to, or takes one from, an agent's held set locks that row first
  (``FOR NO KEY UPDATE``, which does not block foreign-key checks of other inserts).
- Agent rows are locked before ticket rows, several agents in id order. Nobody waits for an
  agent row while holding a ticket lock, so no deadlock cycle can form.
- Pool tickets are taken with ``FOR NO KEY UPDATE SKIP LOCKED``: an agent never waits for a
  ticket another agent is taking; it takes the next one.
- A decision is made only on values read after the locks are held.
"""

import time
from collections.abc import Iterable
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import IntegrityError, transaction
from django.db.models import (
    Count,
    Exists,
    F,
    FilteredRelation,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
)
from django.db.models.functions import Coalesce
from django.utils import timezone

from support import observability as obs
from support.models import ApiToken, Ticket, TicketAssignment, TicketEvent
from support.prepared import Prepared

User = get_user_model()
Status = Ticket.Status
Kind = TicketEvent.Kind

# The agent's state machine: the moves an agent may make on a ticket it holds.
AGENT_MOVES: dict[str, tuple[str, ...]] = {
    Status.OPEN: (),
    Status.ASSIGNED: (Status.RESOLVED,),
    Status.RESOLVED: (Status.CLOSED,),
    Status.CLOSED: (),
}

# Admin edits may set any status, under these rules (checked in ticket_update):
# - "open" has no agent: it ends the active assignment and returns the ticket to the pool;
# - "assigned", "resolved" and "closed" need an agent (given, or already holding the ticket);
# - "assigned" counts toward the agent's cap; "resolved"/"closed" keep the assignment as the
#   record of who worked the ticket.

TICKET_FIELDS = (
    "id",
    "title",
    "description",
    "status",
    "priority",
    "created_by_id",
    "created_at",
    "updated_at",
)

# How many times an admin edit retries when the ticket's holder changed between the unlocked
# read and the locked one (a concurrent fetch or edit); each try is short.
_ADMIN_EDIT_TRIES = 5


# --- Errors the rules raise (mapped to HTTP in support.api.errors) ----------------------------
class ServiceError(Exception):
    """A refused operation; ``detail`` is meant for the person who asked."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class NotFound(ServiceError):
    pass


class Conflict(ServiceError):
    """The request is well-formed but a rule forbids it now (HTTP 409)."""


class TransitionNotAllowed(Conflict):
    def __init__(self, current: str, requested: str, allowed: Iterable[str]):
        allowed = tuple(allowed)
        nxt = ", ".join(allowed) if allowed else "none"
        super().__init__(
            f"Cannot move a ticket from '{current}' to '{requested}'. Allowed next statuses: {nxt}."
        )
        self.current = current
        self.allowed = allowed


class AgentAtCapacity(Conflict):
    pass


class ConcurrentChange(Conflict):
    pass


class InvalidField(ServiceError):
    """A field names something that does not qualify (HTTP 400 with field errors)."""

    def __init__(self, field: str, detail: str):
        super().__init__(detail)
        self.field = field


class AgentInactive(ServiceError):
    """The caller's account was deactivated while the request ran (HTTP 401)."""


class NotAnAgent(ServiceError):
    """The caller is not in the agents group (HTTP 403)."""


# --- Selectors shared by the rules and the read endpoints ------------------------------------
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


def tickets_with_holder() -> QuerySet:
    """Tickets joined (LEFT) to their active assignment, as ``active``."""
    return Ticket.objects.annotate(
        active=FilteredRelation("assignments", condition=Q(assignments__is_active=True))
    )


def ticket_rows(queryset: QuerySet) -> QuerySet:
    """Rows (dicts) with the ticket's fields and its holder, in one query."""
    return queryset.values(
        *TICKET_FIELDS,
        assigned_to=F("active__agent_id"),
        assigned_at=F("active__assigned_at"),
    )


def held_assignments_query(agent_id: int) -> QuerySet:
    """(ticket id, assigned_at) of what the agent holds in status assigned, in answer order:
    read from assignment_agent_holding_idx alone, so the agent's history is never visited."""
    return (
        TicketAssignment.objects.filter(agent_id=agent_id, is_active=True, holding=True)
        .order_by("assigned_at", "ticket_id")
        .values_list("ticket_id", "assigned_at")
    )


_HELD_ASSIGNMENTS = Prepared(held_assignments_query, agent_id=int)


def held_assignments(agent_id: int) -> list[tuple]:
    return _HELD_ASSIGNMENTS.rows(agent_id=agent_id)


def held_tickets(agent_id: int, held: list | None = None) -> list[dict]:
    """The tickets ``agent_id`` holds in status assigned, as rows, in answer order.

    Two reads on purpose (``held`` is the first, when the caller has it): the assignments from
    their index, then those tickets by primary key, each with its active assignment, kept only
    if that still names this agent and holds. As one join driven by the agent, PostgreSQL can
    choose a merge join that walks the ticket table along its primary key once the
    assignments' statistics lag behind fast churn (every new assignment names a ticket newer
    than they know); driven by the primary keys, it cannot.
    """
    if held is None:
        held = held_assignments(agent_id)
    if not held:
        return []
    ids = [pk for pk, _ in held]
    if len(ids) <= _BY_ID_SLOTS:  # one prepared statement, unused slots 0 (no such ticket)
        padded = ids + [0] * (_BY_ID_SLOTS - len(ids))
        found = _HELD_BY_ID.rows(agent_id=agent_id, **dict(zip(_SLOT_NAMES, padded, strict=True)))
    else:
        found = _held_by_id(agent_id, *ids)
    tickets = {row[0]: dict(zip(_ROW_FIELDS, row, strict=True)) for row in found}
    return [
        tickets[pk] for pk, _ in held if pk in tickets and tickets[pk]["status"] == Status.ASSIGNED
    ]


def _held_by_id(agent_id: int, *ids: int) -> QuerySet:
    # by primary key, not by status: a status condition lets the planner prefer the status index
    return ticket_rows(
        tickets_with_holder().filter(pk__in=ids, active__agent_id=agent_id, active__holding=True)
    ).values_list(*_ROW_FIELDS)


# prepared with room for the default cap
_BY_ID_SLOTS = 15
_SLOT_NAMES = [f"t{n}" for n in range(_BY_ID_SLOTS)]
_HELD_BY_ID = Prepared(
    lambda agent_id, **ids: _held_by_id(agent_id, *ids.values()),
    agent_id=int,
    **dict.fromkeys(_SLOT_NAMES, int),
)


def newest_tickets(start: int, size: int) -> list[dict]:
    """A page of the admin list without filters, newest first (count them with
    ``Ticket.objects.count()``, the ticket table alone). The common case, a dashboard's first
    page, runs a statement compiled once per page size."""
    if start == 0:
        prepared = _FIRST_PAGES.get(size)
        if prepared is None:
            prepared = _FIRST_PAGES.setdefault(size, Prepared(lambda: _newest()[:size]))
        rows = prepared.rows()
    else:
        rows = _newest()[start : start + size]
    return [dict(zip(_ROW_FIELDS, row, strict=True)) for row in rows]


def _newest() -> QuerySet:
    ordered = tickets_with_holder().order_by("-created_at", "-id")
    return ticket_rows(ordered).values_list(*_ROW_FIELDS)


_FIRST_PAGES: dict[int, Prepared] = {}  # by page size (at most 100 sizes)


def held_count(user_ref: str = "pk"):
    """How many tickets the user the outer row names holds in status assigned: a count over
    assignment_agent_holding_idx (the user's history is not read)."""
    held = (
        TicketAssignment.objects.filter(agent_id=OuterRef(user_ref), is_active=True, holding=True)
        .order_by()
        .values("agent_id")
        .annotate(n=Count("pk"))
        .values("n")
    )
    return Coalesce(Subquery(held), 0)


def agents_with_load() -> QuerySet:
    """Every agent (active or not) with how many tickets it holds in status assigned."""
    return (
        User.objects.filter(groups__name=settings.SUPPORT_AGENTS_GROUP)
        .annotate(assigned_count=held_count())
        .order_by("pk")
        .values("id", "username", "email", "is_active", "assigned_count")
    )


def ticket_history(ticket_id: int) -> QuerySet:
    """A ticket's events, oldest first (they outlive a deleted ticket)."""
    return (
        TicketEvent.objects.filter(ticket_id=ticket_id)
        .order_by("id")
        .values("id", "at", "actor_id", "kind", "from_status", "to_status", "agent_id", "changes")
    )


def is_holder(*, ticket_id: int, agent_id: int) -> QuerySet:
    return TicketAssignment.objects.filter(ticket_id=ticket_id, agent_id=agent_id, is_active=True)


def agent_holds(*, agent_id: int, ticket_id: int) -> bool:
    """Whether the ticket is one of the agent's (actively assigned to it): an agent's move on
    any other ticket, existing or not, is NotFound alike."""
    return is_holder(ticket_id=ticket_id, agent_id=agent_id).exists()


def _count_assigned(agent_id: int) -> int:
    return TicketAssignment.objects.filter(agent_id=agent_id, is_active=True, holding=True).count()


@dataclass(frozen=True)
class _LockedUser:
    id: int
    is_active: bool
    is_agent: bool


def _lock_users_query(ids: list[int]) -> QuerySet:
    return (
        User.objects.select_for_update(no_key=True, of=("self",))
        .filter(pk__in=ids)
        .annotate(is_agent=is_agent_expr())
        .order_by("pk")
        .values_list("pk", "is_active", "is_agent")
    )


# Every agent change locks one user row: compiled once per process.
_LOCK_ONE_USER = Prepared(lambda pk: _lock_users_query([pk]), pk=int)


def _lock_users(user_ids: Iterable[int]) -> dict[int, _LockedUser]:
    """Lock the given users' rows, in id order, and read them after the lock."""
    ids = sorted(set(user_ids))
    if not ids:
        return {}
    started = time.perf_counter()
    one = len(ids) == 1
    rows = _LOCK_ONE_USER.rows(pk=ids[0]) if one else list(_lock_users_query(ids))
    obs.AGENT_LOCK_WAIT.observe(time.perf_counter() - started)
    return {pk: _LockedUser(pk, active, agent) for pk, active, agent in rows}


def _lock_ticket_row(ticket_id: int) -> dict | None:
    """Lock one ticket's row, then read it with its holder; None when it does not exist.

    Two statements on purpose. Under READ COMMITTED, a locking SELECT that had to wait returns
    the newest ticket row but joins it to assignment rows from its own older snapshot: waiting
    on a top-up that just took the ticket, it would see "assigned" with no holder. The read
    that starts after the lock is held sees the committed holder.
    """
    if not Ticket.objects.select_for_update(no_key=True).filter(pk=ticket_id).exists():
        return None
    return ticket_rows(tickets_with_holder().filter(pk=ticket_id)).first()


def _lock_own_ticket_row(ticket_id: int) -> dict | None:
    """Lock one ticket's row and read it with its holder, in one statement.

    Only for a caller that already holds the agent row of the holder it expects: any change of
    that agent's tickets needs the same agent lock, so none can commit while this statement
    waits, and a stale join can only show a ticket that is not the caller's (a 404 either way).
    """
    rows = _LOCK_OWN_TICKET.rows(pk=ticket_id)
    return dict(zip(_ROW_FIELDS, rows[0], strict=True)) if rows else None


_ROW_FIELDS = (*TICKET_FIELDS, "assigned_to", "assigned_at")
_LOCK_OWN_TICKET = Prepared(
    lambda pk: ticket_rows(
        tickets_with_holder().select_for_update(no_key=True, of=("self",)).filter(pk=pk)
    ).values_list(*_ROW_FIELDS),
    pk=int,
)


def _require_active_agent(locked: dict[int, _LockedUser], agent_id: int) -> None:
    user = locked.get(agent_id)
    if user is None or not user.is_active:
        raise AgentInactive("User inactive or deleted.")
    if not user.is_agent:
        raise NotAnAgent("You do not have permission to perform this action.")


# --- Agents: the top-up and the state machine -------------------------------------------------
NOT_YOURS = "No such ticket among yours."


def tickets_top_up(*, agent_id: int, role_checked: bool = False) -> list[dict]:
    """Top the agent up to the cap from the pool and return what it holds.

    ``role_checked=True`` says the caller has just read the agent's role and active flag (the
    token check of the same request): an agent already at the cap is then answered from one
    plain read, without the transaction below.

    One transaction: lock the agent's row (its own concurrent calls queue here), read what it
    holds in status assigned, take the missing number of open tickets with
    ``FOR NO KEY UPDATE SKIP LOCKED`` in pick order (priority, then created_at, then id), mark
    them assigned and record an assignment for each. Returns the held tickets as rows, ordered
    by assigned_at then id. Raises AgentInactive / NotAnAgent if the caller lost its role.
    """
    cap = settings.SUPPORT_AGENT_MAX_TICKETS
    if role_checked:
        # An agent at the cap takes nothing: plain reads answer it, no lock, no transaction.
        # Only a change can exceed the cap, and every change locks. The second read finds
        # every ticket of the first still held, or the answer comes from the locked path
        # below: with the cap, all of them still held means the held set at that moment.
        held = held_assignments(agent_id)
        if len(held) >= cap:
            rows = held_tickets(agent_id, held)
            if len(rows) == len(held):
                return rows
    with transaction.atomic():
        _require_active_agent(_lock_users([agent_id]), agent_id)
        held = held_tickets(agent_id)
        missing = cap - len(held)
        if missing <= 0:
            return held
        picked = list(
            Ticket.objects.select_for_update(skip_locked=True, no_key=True)
            .filter(status=Status.OPEN)
            .order_by("-priority", "created_at", "id")
            .values(*TICKET_FIELDS)[:missing]
        )
        if not picked:
            transaction.on_commit(lambda: _pool_was_empty(agent_id, missing))
            return held
        now = timezone.now()
        ids = [row["id"] for row in picked]
        Ticket.objects.filter(pk__in=ids).update(status=Status.ASSIGNED, updated_at=now)
        TicketAssignment.objects.bulk_create(
            TicketAssignment(ticket_id=pk, agent_id=agent_id, assigned_at=now) for pk in ids
        )
        TicketEvent.objects.bulk_create(
            TicketEvent(
                ticket_id=pk,
                at=now,
                actor_id=agent_id,
                kind=Kind.ASSIGNED,
                from_status=Status.OPEN,
                to_status=Status.ASSIGNED,
                agent_id=agent_id,
                changes={"assigned_to": [None, agent_id], "status": ["open", "assigned"]},
            )
            for pk in ids
        )
        for row in picked:
            row.update(
                status=Status.ASSIGNED, updated_at=now, assigned_to=agent_id, assigned_at=now
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


def ticket_transition_by_agent(*, agent_id: int, ticket_id: int, to_status: str) -> dict:
    """Move a ticket the agent holds one step along AGENT_MOVES.

    Locks the agent row, then the ticket row. Raises NotFound when the ticket does not exist or
    is not actively assigned to the agent (the two are not told apart), TransitionNotAllowed for
    a move the state machine forbids.
    """
    with transaction.atomic():
        _require_active_agent(_lock_users([agent_id]), agent_id)
        row = _lock_own_ticket_row(ticket_id)
        if row is None or row["assigned_to"] != agent_id:
            raise NotFound(NOT_YOURS)
        allowed = AGENT_MOVES[row["status"]]
        if to_status not in allowed:
            raise TransitionNotAllowed(row["status"], to_status, allowed)
        now = timezone.now()
        Ticket.objects.filter(pk=ticket_id).update(status=to_status, updated_at=now)
        if row["status"] == Status.ASSIGNED:  # it no longer counts toward the cap
            TicketAssignment.objects.filter(ticket_id=ticket_id, is_active=True).update(
                holding=False
            )
        TicketEvent.objects.create(
            ticket_id=ticket_id,
            at=now,
            actor_id=agent_id,
            kind=Kind.STATUS_CHANGED,
            from_status=row["status"],
            to_status=to_status,
            agent_id=agent_id,
            changes={"status": [row["status"], to_status]},
        )
        transaction.on_commit(
            lambda: obs.log_event(
                f"ticket {to_status} by agent", ticket_id=ticket_id, agent_id=agent_id
            )
        )
        row.update(status=to_status, updated_at=now)
        return row


# --- Admins: tickets ------------------------------------------------------------------------
def ticket_create(*, title: str, description: str, priority: int, created_by_id: int) -> dict:
    with transaction.atomic():
        ticket = Ticket.objects.create(
            title=title, description=description, priority=priority, created_by_id=created_by_id
        )
        TicketEvent.objects.create(
            ticket=ticket,
            at=ticket.created_at,
            actor_id=created_by_id,
            kind=Kind.CREATED,
            to_status=Status.OPEN,
            changes={
                "title": [None, title],
                "description": [None, description],
                "priority": [None, Ticket.Priority(priority).label],
            },
        )
    row = {name: getattr(ticket, name) for name in TICKET_FIELDS}
    return {**row, "assigned_to": None, "assigned_at": None}  # a new ticket is in the pool


def ticket_holder(ticket_id: int) -> int | None:
    """The agent actively holding the ticket (None: in the pool). Raises NotFound when there
    is no such ticket: the API asks this before it reads an edit's body, so an unknown ticket
    is 404 whatever the body says, and hands the answer to ticket_update as its first read."""
    row = ticket_rows(tickets_with_holder().filter(pk=ticket_id)).first()
    if row is None:
        raise NotFound("No Ticket matches the given query.")
    return row["assigned_to"]


_UNREAD = object()


def ticket_update(*, ticket_id: int, changes: dict, actor_id: int, holder=_UNREAD) -> dict:
    """Apply an admin's edit: any of title, description, priority, status, assigned_to.

    ``assigned_to`` present and None means "no agent". ``holder``: what ``ticket_holder``
    answered just before, if the caller asked it. Locks the current holder and the new
    agent (id order), then the ticket; if the holder changed before the locks were taken, the
    edit starts over (ConcurrentChange after a few tries). Raises InvalidField when
    ``assigned_to`` is not an active agent, Conflict when the result would break a rule, and
    AgentAtCapacity when the agent already holds the cap in status assigned.
    """
    for _ in range(_ADMIN_EDIT_TRIES):
        if holder is _UNREAD:
            holder = ticket_holder(ticket_id)
        wanted = changes.get("assigned_to", holder)
        with transaction.atomic():
            locked = _lock_users(pk for pk in (holder, wanted) if pk is not None)
            row = _lock_ticket_row(ticket_id)
            if row is None:
                raise NotFound("No Ticket matches the given query.")
            if row["assigned_to"] != holder:
                holder = _UNREAD  # a concurrent change moved the ticket: read it again
                continue
            return _apply_admin_edit(row, changes, locked, actor_id)
    raise ConcurrentChange("The ticket kept changing while it was being edited; try again.")


def _apply_admin_edit(
    row: dict, changes: dict, locked: dict[int, _LockedUser], actor_id: int
) -> dict:
    holder, current = row["assigned_to"], row["status"]
    status = changes.get("status")
    if "assigned_to" in changes:
        agent = changes["assigned_to"]
        if agent is not None and agent != holder:
            user = locked.get(agent)
            if user is None or not user.is_active or not user.is_agent:
                raise InvalidField("assigned_to", f"User {agent} is not an active agent.")
        if status is None:
            if agent is None:
                status = Status.OPEN
            else:
                status = Status.ASSIGNED if current == Status.OPEN else current
    else:
        status = status or current
        agent = None if status == Status.OPEN else holder

    if status == Status.OPEN and agent is not None:
        raise Conflict(
            "An open ticket has no agent: leave assigned_to out or set it to null, "
            "or choose another status."
        )
    if status != Status.OPEN and agent is None:
        raise Conflict(f"A ticket in status '{status}' needs an agent: give assigned_to.")
    if status == Status.ASSIGNED:
        user = locked.get(agent)
        if user is None or not user.is_active or not user.is_agent:
            raise Conflict(f"User {agent} is no longer an active agent; assign someone else.")
        gains = not (current == Status.ASSIGNED and agent == holder)
        cap = settings.SUPPORT_AGENT_MAX_TICKETS
        if gains and _count_assigned(agent) >= cap:
            obs.CAP_REFUSALS.inc()
            obs.log_event("assignment refused at the cap", agent_id=agent, ticket_id=row["id"])
            raise AgentAtCapacity(
                f"Agent {_agent_name(agent)} already holds {cap} assigned tickets (the cap)."
            )

    fields = {
        name: changes[name] for name in ("title", "description", "priority") if name in changes
    }
    fields["status"] = status
    diff = {name: [row[name], value] for name, value in fields.items() if row[name] != value}
    if agent != holder:
        diff["assigned_to"] = [holder, agent]
    if not diff:
        return row

    now = timezone.now()
    ticket_id = row["id"]
    holding = status == Status.ASSIGNED
    if agent != holder:
        if holder is not None:
            TicketAssignment.objects.filter(ticket_id=ticket_id, is_active=True).update(
                is_active=False, holding=False
            )
        if agent is not None:
            TicketAssignment.objects.create(
                ticket_id=ticket_id, agent_id=agent, assigned_at=now, holding=holding
            )
    elif agent is not None and holding != (current == Status.ASSIGNED):
        TicketAssignment.objects.filter(ticket_id=ticket_id, is_active=True).update(holding=holding)
    Ticket.objects.filter(pk=ticket_id).update(**fields, updated_at=now)
    kind = _record(ticket_id, actor_id, diff, from_status=current, agent=agent or holder, at=now)
    transaction.on_commit(
        lambda: obs.log_event(
            f"ticket {kind} by admin", ticket_id=ticket_id, actor_id=actor_id, changes=diff
        )
    )
    return ticket_rows(tickets_with_holder().filter(pk=ticket_id)).get()


def _agent_name(agent_id: int) -> str:
    """An agent as people know it, by username (forms list agents by name), with its id."""
    username = User.objects.filter(pk=agent_id).values_list("username", flat=True).first()
    return f"{username} (id {agent_id})" if username is not None else f"#{agent_id}"


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


def _record(ticket_id, actor_id, diff, *, from_status, agent, at) -> str:
    if "priority" in diff:
        diff["priority"] = [Ticket.Priority(rank).label for rank in diff["priority"]]
    to_status = diff["status"][1] if "status" in diff else from_status
    kind = _event_kind(diff)
    TicketEvent.objects.create(
        ticket_id=ticket_id,
        at=at,
        actor_id=actor_id,
        kind=kind,
        from_status=from_status,
        to_status=to_status,
        agent_id=agent,
        changes=diff,
    )
    return kind


def ticket_delete(*, ticket_id: int, actor_id: int) -> None:
    """Delete a ticket and its assignments, locking its holder first like any other change."""
    for _ in range(_ADMIN_EDIT_TRIES):
        holder = ticket_holder(ticket_id)
        with transaction.atomic():
            _lock_users([holder] if holder is not None else [])
            row = _lock_ticket_row(ticket_id)
            if row is None:
                raise NotFound("No Ticket matches the given query.")
            if row["assigned_to"] != holder:
                continue
            Ticket.objects.filter(pk=ticket_id).delete()
            TicketEvent.objects.create(
                ticket_id=ticket_id,
                actor_id=actor_id,
                kind=Kind.DELETED,
                from_status=row["status"],
                agent_id=holder,
            )
            return
    raise ConcurrentChange("The ticket kept changing while it was being deleted; try again.")


# --- Admins: agents -------------------------------------------------------------------------
USERNAME_TAKEN = "A user with that username already exists (usernames ignore case)."


def agent_row(agent_id: int) -> dict:
    """An agent (active or not) as the API shows it; NotFound for anyone else."""
    row = agents_with_load().filter(pk=agent_id).first()
    if row is None:
        raise NotFound("No agent matches the given query.")
    return row


def agent_create(*, username: str, password: str, email: str = ""):
    """Create an active user in the agents group. Raises InvalidField when the name is taken,
    in any case: with "alice" taken, "Alice" is refused (as the admin site's user form does).

    Creations queue on the agents group's row (FOR NO KEY UPDATE: memberships added meanwhile
    do not wait), so two names that differ only in case cannot both pass the check; the
    database's unique index is case-sensitive. The password is expected to have passed
    Django's validators already (the serializer's job).
    """
    try:
        with transaction.atomic():
            group = agents_group()
            Group.objects.select_for_update(no_key=True).filter(pk=group.pk).first()
            if User.objects.filter(username__iexact=username).exists():
                raise InvalidField("username", USERNAME_TAKEN)
            user = User.objects.create_user(username=username, password=password, email=email)
            user.groups.add(group)
    except IntegrityError:
        # Two creations of one name raced; the database's unique index decided.
        raise InvalidField("username", USERNAME_TAKEN) from None
    return user


def agent_reactivate(*, agent_id: int) -> None:
    """Make a deactivated agent active again. It holds no ticket (deactivation returned them
    to the pool) and no token (it logs in again). Locks the agent row. Idempotent."""
    with transaction.atomic():
        locked = _lock_users([agent_id])
        if agent_id not in locked or not locked[agent_id].is_agent:
            raise NotFound("No agent matches the given query.")
        if not locked[agent_id].is_active:
            User.objects.filter(pk=agent_id).update(is_active=True)


def agent_deactivate(*, agent_id: int, actor_id: int) -> None:
    """Deactivate an agent and return every ticket it holds in status assigned to the pool.

    Locks the agent row, then its tickets. Resolved and closed tickets keep their assignment as
    the record of who worked them. The agent's tokens are deleted. Idempotent.
    """
    with transaction.atomic():
        locked = _lock_users([agent_id])
        if agent_id not in locked or not locked[agent_id].is_agent:
            raise NotFound("No agent matches the given query.")
        User.objects.filter(pk=agent_id).update(is_active=False)
        _release_assigned(agent_id, actor_id)
        ApiToken.objects.filter(user_id=agent_id).delete()


def agent_release_tickets(*, agent_id: int, actor_id: int) -> list[int]:
    """Return every ticket the user holds in status assigned to the pool (for a user that is
    losing its agent role). Locks the user row, then the tickets; returns the released ids."""
    with transaction.atomic():
        _lock_users([agent_id])
        return _release_assigned(agent_id, actor_id)


def _release_assigned(agent_id: int, actor_id: int) -> list[int]:
    """Under the agent's row lock: its assigned tickets back to the pool, with their events."""
    released = list(
        Ticket.objects.select_for_update(no_key=True, of=("self",))
        .filter(
            assignments__agent_id=agent_id,
            assignments__is_active=True,
            assignments__holding=True,
        )
        .values_list("pk", flat=True)
    )
    if not released:
        return released
    now = timezone.now()
    TicketAssignment.objects.filter(ticket_id__in=released, is_active=True).update(
        is_active=False, holding=False
    )
    Ticket.objects.filter(pk__in=released).update(status=Status.OPEN, updated_at=now)
    TicketEvent.objects.bulk_create(
        TicketEvent(
            ticket_id=pk,
            at=now,
            actor_id=actor_id,
            kind=Kind.RELEASED,
            from_status=Status.ASSIGNED,
            to_status=Status.OPEN,
            agent_id=agent_id,
            changes={"assigned_to": [agent_id, None], "status": ["assigned", "open"]},
        )
        for pk in released
    )
    return released
