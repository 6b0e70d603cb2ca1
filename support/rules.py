"""What may happen to a ticket: its statuses, every move between them and who may make it.

This table is the one statement of a ticket's life. The services enforce it
(``support.services``), the serializers' and the schema's status choices, the 409 answer's
``allowed`` list and the README's diagram are made from it or tested against it
(``tests/test_rules.py``). Plain Python, no Django models: the settings read it too.

A ticket is in one of four statuses. Every status but ``open`` has an agent: the holder, on
the ticket row itself (``Ticket.assigned_to``; the database refuses an open ticket with an
agent and any other without one). ``assigned`` tickets count toward their agent's cap;
``resolved`` and ``closed`` keep their agent as the record of who worked the ticket.

Who moves a ticket:

- ``FETCH``: the agent's fetch, which takes open tickets from the pool, up to the cap;
- ``AGENT``: the agent holding the ticket, on its own ticket only;
- ``ADMIN``: an admin's edit (PUT/PATCH, the admin site), which may also give the ticket to
  another agent without a status change (a reassignment is not a move in this table);
- ``RELEASE``: the service itself, when an agent is deactivated or loses its role, or stays
  silent longer than ``SUPPORT_AGENT_IDLE_RELEASE_SECONDS`` (support.services.idle_release):
  its ``assigned`` tickets go back to the pool;
- ``HAND_BACK``: the holder giving one of its ``assigned`` tickets back to the pool
  (``POST /api/agent/tickets/{id}/release/``).

Why a hand-back is not an ``AGENT`` move: ``AGENT``'s moves are the statuses an agent asks
for on the move endpoint (``AGENT_TARGETS``, its body's enum), the work done on a ticket it
keeps. Handing a ticket back is letting go of it, not choosing a status for it; it has an
operation of its own, and listing it under ``AGENT`` would offer ``open`` on the move endpoint
too, a second way to do one thing. So it is an actor of its own, like the service's release,
and the table still says in one row everyone who may put an assigned ticket back in the pool.
"""

from dataclasses import dataclass
from enum import StrEnum

from django.conf import settings


class Status(StrEnum):
    OPEN = "open"
    ASSIGNED = "assigned"
    RESOLVED = "resolved"
    CLOSED = "closed"


STATUSES: tuple[str, ...] = tuple(Status)


class Actor(StrEnum):
    FETCH = "fetch"
    AGENT = "agent"
    ADMIN = "admin"
    RELEASE = "release"
    HAND_BACK = "hand-back"


@dataclass(frozen=True)
class Move:
    """One move from a status to another: who may make it and what it does to the holder."""

    by: frozenset[Actor]
    needs_agent: bool  # the ticket has an agent after the move
    counts_toward_cap: bool  # the agent's held count grows (refused at the cap)
    ends_assignment: bool  # the holder lets go: the ticket returns to the pool


def _move(*by: Actor, needs_agent, counts_toward_cap=False, ends_assignment=False) -> Move:
    return Move(frozenset(by), needs_agent, counts_toward_cap, ends_assignment)


FETCH, AGENT, ADMIN, RELEASE, HAND_BACK = Actor
OPEN, ASSIGNED, RESOLVED, CLOSED = Status

# (from, to) -> Move. A pair that is not here is no move at all.
TRANSITIONS: dict[tuple[Status, Status], Move] = {
    # into the agent's hands: from the pool by a fetch, or given by an admin
    (OPEN, ASSIGNED): _move(FETCH, ADMIN, needs_agent=True, counts_toward_cap=True),
    # the work: the holder (or an admin for it) resolves, then closes
    (ASSIGNED, RESOLVED): _move(AGENT, ADMIN, needs_agent=True),
    (RESOLVED, CLOSED): _move(AGENT, ADMIN, needs_agent=True),
    # back to the pool: released by an admin, by the service when the agent goes away or goes
    # silent, or handed back by the holder itself
    (ASSIGNED, OPEN): _move(ADMIN, RELEASE, HAND_BACK, needs_agent=False, ends_assignment=True),
    # an admin's corrections, each with an agent except to open
    (ASSIGNED, CLOSED): _move(ADMIN, needs_agent=True),
    (RESOLVED, ASSIGNED): _move(ADMIN, needs_agent=True, counts_toward_cap=True),
    (RESOLVED, OPEN): _move(ADMIN, needs_agent=False, ends_assignment=True),
    (CLOSED, ASSIGNED): _move(ADMIN, needs_agent=True, counts_toward_cap=True),
    (CLOSED, RESOLVED): _move(ADMIN, needs_agent=True),
    (CLOSED, OPEN): _move(ADMIN, needs_agent=False, ends_assignment=True),
    (OPEN, RESOLVED): _move(ADMIN, needs_agent=True),
    (OPEN, CLOSED): _move(ADMIN, needs_agent=True),
}


def move(current: str, to: str) -> Move | None:
    """The move from ``current`` to ``to``; None when there is none (or they are equal, or
    either is no status at all)."""
    return TRANSITIONS.get((current, to))


def allowed(current: str, actor: Actor) -> tuple[Status, ...]:
    """The statuses ``actor`` may move a ticket to from ``current``, in status order."""
    return tuple(to for to in Status if (m := move(current, to)) and actor in m.by)


def _into(status: str, what: str) -> bool:
    # what every move into ``status`` says (the table's moves into a status agree: tested)
    return any(getattr(m, what) for (_, to), m in TRANSITIONS.items() if to == status)


def has_agent(status: str) -> bool:
    """Whether a ticket in this status has an agent (every status but open)."""
    return _into(status, "needs_agent")


def counts_toward_cap(status: str) -> bool:
    """Whether a ticket in this status counts toward its agent's cap."""
    return _into(status, "counts_toward_cap")


def cap() -> int:
    """How many assigned tickets an agent may hold (SUPPORT_AGENT_MAX_TICKETS). New
    assignments are refused at the cap; lowering it takes nothing away from anyone."""
    return settings.SUPPORT_AGENT_MAX_TICKETS


# The statuses an agent may ask for, in the request body of its move.
AGENT_TARGETS: tuple[Status, ...] = tuple(
    to for to in Status if any(AGENT in m.by for (_, t), m in TRANSITIONS.items() if t == to)
)


def table_markdown() -> str:
    """The table as the README prints it (``python -m support.rules`` writes it)."""
    lines = [
        "| from → to | who may | agent after | counts toward the cap | ends the assignment |",
        "|---|---|---|---|---|",
    ]
    for (current, to), m in TRANSITIONS.items():
        who = ", ".join(a.value for a in Actor if a in m.by)
        lines.append(
            f"| {current} → {to} | {who} | {'yes' if m.needs_agent else 'no'} "
            f"| {'yes' if m.counts_toward_cap else 'no'} "
            f"| {'yes' if m.ends_assignment else 'no'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table_markdown())
