"""Random sequences of admin and agent operations against a small reference model of the rules.

A Hypothesis state machine calls the real service functions (support.services: the agents'
top-up and moves, the admins' create, edit, delete and deactivate) in random order, with a cap
of 3 so that it is reached often. Next to the database it keeps a plain Python model of what
the README's rules say must happen: each ticket's status, holder, priority and age, each
agent's active flag, the pool order (priority, then created_at, then id) and the answer order
of a fetch (assigned_at, then id).

After every step:
- a refused operation raised exactly the exception class the model predicts, and changed
  nothing; an accepted one returned what the model predicts (for a top-up: the same tickets in
  the same order);
- every ticket's status, holder, title, description and priority in the database equal the
  model's, as do the agents' active flags and assigned counts;
- the number of history events is the model's (a change writes one event per ticket it
  touches; a refusal or an edit that changes nothing writes none);
- tests.invariants.assert_invariants() holds (one active assignment per ticket, the cap,
  status agrees with assignment, history replays to the current state).
"""

import collections
import itertools
from dataclasses import dataclass

import pytest
from django.test import override_settings
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from support import services
from support.models import Ticket, TicketAssignment, TicketEvent
from tests.invariants import assert_invariants

pytestmark = pytest.mark.django_db(transaction=True)

CAP = 3
AGENTS = 4
OPEN, ASSIGNED, RESOLVED, CLOSED = "open", "assigned", "resolved", "closed"
STATUSES = (OPEN, ASSIGNED, RESOLVED, CLOSED)
# What an agent may do next from each status (README: State machine).
AGENT_NEXT = {OPEN: (), ASSIGNED: (RESOLVED,), RESOLVED: (CLOSED,), CLOSED: ()}
GHOST_ID = 2**62  # never a ticket's or a user's id
# The operations a step draws from, weighted: agents work more than admins edit.
OPERATIONS = (
    ["create"] * 3
    + ["fetch"] * 3
    + ["move"] * 4
    + ["edit"] * 3
    + ["assign"] * 3
    + ["delete", "deactivate"]
)
# What the run exercised: (operation, "done" or the refusal's class name) -> count.
OUTCOMES: collections.Counter = collections.Counter()
MUST_HAPPEN = [
    ("fetch", "done"),
    ("fetch", "at the cap"),
    ("fetch", "AgentInactive"),
    ("fetch", "NotAnAgent"),
    ("move", "done"),
    ("move", "NotFound"),
    ("move", "TransitionNotAllowed"),
    ("edit", "done"),
    ("edit", "Conflict"),
    ("assign", "done"),
    ("assign", "AgentAtCapacity"),
    ("assign", "InvalidField"),
    ("delete", "done"),
    ("deactivate", "done"),
]

_names = itertools.count(1)
texts = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00", exclude_categories=["Cs"]),
    min_size=1,
    max_size=12,
)


@dataclass
class ModelTicket:
    id: int
    title: str
    description: str
    priority: int
    created_at: object
    status: str = OPEN
    holder: int | None = None
    assigned_tick: int = 0  # the model's clock when the current holder got it


class Refused(Exception):
    """The model's prediction that the service refuses: carries the expected class."""

    def __init__(self, expected: type[services.ServiceError]):
        super().__init__(expected.__name__)
        self.expected = expected


class TicketRules(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        # Each example starts from an empty database (the rows are committed).
        TicketEvent.objects.all().delete()
        TicketAssignment.objects.all().delete()
        Ticket.objects.all().delete()
        services.User.objects.all().delete()
        group = services.agents_group()
        self.admin = services.User.objects.create_user(
            username=f"mb-admin-{next(_names)}", is_staff=True
        )
        self.active: dict[int, bool] = {}
        for _ in range(AGENTS):
            agent = services.User.objects.create_user(username=f"mb-agent-{next(_names)}")
            agent.groups.add(group)
            self.active[agent.pk] = True
        self.tickets: dict[int, ModelTicket] = {}
        self.gone: list[int] = []  # deleted tickets: every operation on them is NotFound
        self.clock = 0  # orders assignments the way assigned_at does
        self.events = 0

    # --- the model's reading of the rules -------------------------------------------------------
    def held(self, agent_id: int) -> list[ModelTicket]:
        return [t for t in self.tickets.values() if t.holder == agent_id and t.status == ASSIGNED]

    def pool(self) -> list[ModelTicket]:
        open_ = [t for t in self.tickets.values() if t.status == OPEN]
        return sorted(open_, key=lambda t: (-t.priority, t.created_at, t.id))

    def is_active_agent(self, user_id: int | None) -> bool:
        return self.active.get(user_id, False)

    def require_active_agent(self, user_id: int) -> None:
        if user_id not in self.active:
            raise Refused(services.NotAnAgent)
        if not self.active[user_id]:
            raise Refused(services.AgentInactive)

    def give(self, ticket: ModelTicket, agent_id: int | None) -> None:
        if agent_id != ticket.holder and agent_id is not None:
            ticket.assigned_tick = self.clock
        ticket.holder = agent_id

    def predict_top_up(self, agent_id: int) -> list[int]:
        self.require_active_agent(agent_id)
        held = self.held(agent_id)
        picked = self.pool()[: max(0, CAP - len(held))]
        self.clock += 1
        for ticket in picked:
            ticket.status = ASSIGNED
            self.give(ticket, agent_id)
        self.events += len(picked)
        answer = held + picked
        return [t.id for t in sorted(answer, key=lambda t: (t.assigned_tick, t.id))]

    def predict_move(self, agent_id: int, ticket_id: int, to_status: str) -> ModelTicket:
        self.require_active_agent(agent_id)
        ticket = self.tickets.get(ticket_id)
        if ticket is None or ticket.holder != agent_id:
            raise Refused(services.NotFound)
        if to_status not in AGENT_NEXT[ticket.status]:
            raise Refused(services.TransitionNotAllowed)
        ticket.status = to_status
        self.events += 1
        return ticket

    def predict_update(self, ticket_id: int, changes: dict) -> ModelTicket:
        """README, admins: PUT/PATCH rules, checked in the order the answer names them."""
        ticket = self.tickets.get(ticket_id)
        if ticket is None:
            raise Refused(services.NotFound)
        holder, current = ticket.holder, ticket.status
        if "assigned_to" in changes:
            agent = changes["assigned_to"]
            if agent is not None and agent != holder and not self.is_active_agent(agent):
                raise Refused(services.InvalidField)  # 400: not an active agent
            if "status" in changes:
                status = changes["status"]
            elif agent is None:
                status = OPEN  # assigned_to null returns the ticket to the pool
            else:
                status = ASSIGNED if current == OPEN else current
        else:
            status = changes.get("status", current)
            agent = None if status == OPEN else holder  # open ends the assignment
        if status == OPEN and agent is not None:
            raise Refused(services.Conflict)
        if status != OPEN and agent is None:
            raise Refused(services.Conflict)
        if status == ASSIGNED:
            if not self.is_active_agent(agent):
                raise Refused(services.Conflict)
            gains = not (current == ASSIGNED and agent == holder)
            if gains and len(self.held(agent)) >= CAP:
                raise Refused(services.AgentAtCapacity)
        fields = {k: changes[k] for k in ("title", "description", "priority") if k in changes}
        changed = status != current or agent != holder
        changed |= any(getattr(ticket, k) != v for k, v in fields.items())
        if changed:
            self.clock += 1
            for name, value in fields.items():
                setattr(ticket, name, value)
            ticket.status = status
            self.give(ticket, agent)
            self.events += 1
        return ticket

    def predict_delete(self, ticket_id: int) -> None:
        if ticket_id not in self.tickets:
            raise Refused(services.NotFound)
        del self.tickets[ticket_id]
        self.gone.append(ticket_id)
        self.events += 1

    def predict_deactivate(self, agent_id: int) -> None:
        if agent_id not in self.active:
            raise Refused(services.NotFound)
        self.active[agent_id] = False
        for ticket in self.held(agent_id):
            ticket.status = OPEN
            self.give(ticket, None)
            self.events += 1

    # --- running one operation on both ----------------------------------------------------------
    def both(self, operation, predict, call):
        """Run the model, then the service; both must accept alike or refuse alike."""
        try:
            expected = predict()
        except Refused as refusal:
            refused_with = refusal.expected
        else:
            result = call()
            OUTCOMES[operation, "done"] += 1
            return expected, result
        with pytest.raises(services.ServiceError) as raised:
            call()
        assert type(raised.value) is refused_with, (
            f"service raised {type(raised.value).__name__} ({raised.value.detail}), "
            f"the model expected {refused_with.__name__}"
        )
        OUTCOMES[operation, refused_with.__name__] += 1
        return None, None

    # --- strategies over the machine's own ids (mostly ones that exist) -----------------------
    def ticket_ids(self):
        return st.sampled_from(sorted(self.tickets) * 4 + self.gone + [GHOST_ID])

    def agent_ids(self):
        """Mostly active agents; sometimes an inactive one, the admin (no agent) or nobody."""
        active = sorted(pk for pk, on in self.active.items() if on)
        inactive = sorted(pk for pk, on in self.active.items() if not on)
        return st.sampled_from(active * 4 + inactive + [self.admin.pk, GHOST_ID])

    def callers(self):
        """Agents calling the agent services; sometimes the admin, who is not one."""
        return st.sampled_from(sorted(self.active) * 3 + [self.admin.pk])

    # --- the operations -------------------------------------------------------------------------
    # One rule draws the operation from a weighted list (Hypothesis' per-rule choice would
    # leave whole runs to one or two operations): every run meets the cap, the state machine's
    # refusals and the admins' rules.
    @initialize(priorities=st.lists(st.integers(0, 3), max_size=3 * CAP))
    def a_pool_to_start_with(self, priorities):
        for priority in priorities:
            self.create(title="t", description="", priority=priority)

    @rule(operation=st.sampled_from(OPERATIONS), data=st.data())
    def step(self, operation, data):
        getattr(self, operation)(data)

    def create(self, data=None, *, title=None, description=None, priority=None):
        if data is not None:
            title = data.draw(texts, label="title")
            description = data.draw(texts, label="description")
            priority = data.draw(st.integers(0, 3), label="priority")
        row = services.ticket_create(
            title=title, description=description, priority=priority, created_by_id=self.admin.pk
        )
        assert (row["status"], row["assigned_to_id"]) == (OPEN, None)
        self.tickets[row["id"]] = ModelTicket(
            row["id"], title, description, priority, row["created_at"]
        )
        self.events += 1
        OUTCOMES["create", "done"] += 1

    def fetch(self, data):
        agent_id = data.draw(self.callers(), label="caller")
        expected, rows = self.both(
            "fetch",
            lambda: self.predict_top_up(agent_id),
            lambda: services.tickets_top_up(agent_id=agent_id),
        )
        if rows is not None:
            assert [row["id"] for row in rows] == expected
            assert all(row["assigned_to_id"] == agent_id for row in rows)
            assert all(row["status"] == ASSIGNED for row in rows)
            if len(rows) == CAP:
                OUTCOMES["fetch", "at the cap"] += 1

    def move(self, data):
        # Mostly a ticket an agent could move, by its holder, so that moves are accepted too.
        movable = sorted(
            t.id
            for t in self.tickets.values()
            if self.active.get(t.holder) and t.status in (ASSIGNED, RESOLVED)
        )
        ticket_id = data.draw(
            (st.sampled_from(movable * 3) if movable else st.nothing()) | self.ticket_ids(),
            label="ticket",
        )
        holder = self.tickets[ticket_id].holder if ticket_id in self.tickets else None
        agent_id = data.draw(
            st.sampled_from([holder] * 3) | self.callers() if holder else self.callers(),
            label="caller",
        )
        to_status = data.draw(st.sampled_from([RESOLVED, CLOSED]), label="to_status")
        expected, row = self.both(
            "move",
            lambda: self.predict_move(agent_id, ticket_id, to_status),
            lambda: services.ticket_transition_by_agent(
                agent_id=agent_id, ticket_id=ticket_id, to_status=to_status
            ),
        )
        if row is not None:
            assert (row["id"], row["status"], row["assigned_to_id"]) == (
                expected.id,
                expected.status,
                expected.holder,
            )

    def edit(self, data):
        """Any subset of the writable fields, as a PATCH (or a PUT, with all five) sends them."""
        ticket_id = data.draw(self.ticket_ids(), label="ticket")
        changes = data.draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "title": texts,
                    "description": texts,
                    "priority": st.integers(0, 3),
                    "status": st.sampled_from(STATUSES),
                    "assigned_to": st.none() | self.agent_ids(),
                },
            ),
            label="changes",
        )
        self.update("edit", ticket_id, changes)

    def assign(self, data):
        """The common edit, {"assigned_to"}: mostly a pool ticket, to any agent (full or not)."""
        pool = [t.id for t in self.pool()]
        ticket_id = data.draw(
            (st.sampled_from(pool * 3) if pool else st.nothing()) | self.ticket_ids(),
            label="ticket",
        )
        changes = {"assigned_to": data.draw(self.agent_ids(), label="agent")}
        if data.draw(st.booleans(), label="with status assigned"):
            changes["status"] = ASSIGNED
        self.update("assign", ticket_id, changes)

    def update(self, operation, ticket_id, changes):
        expected, row = self.both(
            operation,
            lambda: self.predict_update(ticket_id, changes),
            lambda: services.ticket_update(
                ticket_id=ticket_id, changes=dict(changes), actor_id=self.admin.pk
            ),
        )
        if row is not None:
            assert (row["id"], row["status"], row["assigned_to_id"], row["priority"]) == (
                expected.id,
                expected.status,
                expected.holder,
                expected.priority,
            )

    def delete(self, data):
        ticket_id = data.draw(self.ticket_ids(), label="ticket")
        self.both(
            "delete",
            lambda: self.predict_delete(ticket_id),
            lambda: services.ticket_delete(ticket_id=ticket_id, actor_id=self.admin.pk),
        )

    def deactivate(self, data):
        if sum(self.active.values()) <= 2:
            # Two of the four agents at most, so that the rest of the run has agents working.
            return self.fetch(data)
        agent_id = data.draw(self.agent_ids(), label="agent")
        self.both(
            "deactivate",
            lambda: self.predict_deactivate(agent_id),
            lambda: services.agent_deactivate(agent_id=agent_id, actor_id=self.admin.pk),
        )

    # --- after every step ----------------------------------------------------------------------
    @invariant()
    def database_matches_the_model(self):
        rows = {row["id"]: row for row in services.ticket_rows(Ticket.objects.order_by("id"))}
        assert sorted(rows) == sorted(self.tickets)
        for ticket_id, ticket in self.tickets.items():
            row = rows[ticket_id]
            actual = (row["status"], row["assigned_to_id"], row["priority"])
            actual += (row["title"], row["description"])
            expected = (ticket.status, ticket.holder, ticket.priority)
            expected += (ticket.title, ticket.description)
            assert actual == expected, f"ticket {ticket_id}"
        agents = {row["id"]: row for row in services.agents_with_load()}
        assert {pk: row["is_active"] for pk, row in agents.items()} == self.active
        assert {pk: row["assigned_count"] for pk, row in agents.items()} == {
            pk: len(self.held(pk)) for pk in self.active
        }
        assert TicketEvent.objects.count() == self.events

    @invariant()
    def guarantees_hold(self):
        assert_invariants()


def test_random_operations_follow_the_rules():
    OUTCOMES.clear()
    with override_settings(SUPPORT_AGENT_MAX_TICKETS=CAP):
        run_state_machine_as_test(
            TicketRules,
            settings=settings(
                max_examples=25,
                stateful_step_count=30,
                deadline=None,  # each step waits on PostgreSQL
                derandomize=True,  # the same sequences on every run
                database=None,
            ),
        )
    # Not a vacuous pass: the run met the cap and each kind of refusal, and accepted moves.
    missing = [outcome for outcome in MUST_HAPPEN if not OUTCOMES[outcome]]
    assert not missing, f"the run never reached {missing}; it did {dict(OUTCOMES)}"
