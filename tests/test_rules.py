"""support.rules is the one statement of a ticket's life: the code and the docs agree with it."""

import re
from pathlib import Path

import pytest

from support import rules
from support.api import serializers
from support.models import Ticket
from support.rules import ADMIN, AGENT, FETCH, HAND_BACK, RELEASE, Status
from tests.conftest import create_held, create_user

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_table_is_consistent_with_itself():
    assert set(rules.STATUSES) == {"open", "assigned", "resolved", "closed"}
    assert [s for s in rules.STATUSES if rules.has_agent(s)] == ["assigned", "resolved", "closed"]
    assert [s for s in rules.STATUSES if rules.counts_toward_cap(s)] == ["assigned"]
    assert rules.move("open", "no-such-status") is None
    assert rules.allowed("no-such-status", rules.ADMIN) == ()
    for (current, to), move in rules.TRANSITIONS.items():
        assert current != to
        assert move.by, (current, to)
        assert move.needs_agent == rules.has_agent(to), (current, to)
        assert move.ends_assignment == (to == Status.OPEN), (current, to)
        assert move.counts_toward_cap == rules.counts_toward_cap(to), (current, to)
    # the pool is left only by a fetch or an admin, entered only by an admin, a release or a
    # hand-back
    assert {a for (c, _), m in rules.TRANSITIONS.items() if c == Status.OPEN for a in m.by} == {
        FETCH,
        ADMIN,
    }
    into_pool = {a for (_, t), m in rules.TRANSITIONS.items() if t == Status.OPEN for a in m.by}
    assert into_pool == {ADMIN, RELEASE, HAND_BACK}


def test_the_agents_moves_are_the_tables():
    assert rules.allowed("assigned", AGENT) == ("resolved",)
    assert rules.allowed("resolved", AGENT) == ("closed",)
    assert rules.allowed("closed", AGENT) == ()
    assert rules.allowed("open", AGENT) == ()
    assert rules.AGENT_TARGETS == ("resolved", "closed")


def test_an_agent_hands_back_only_an_assigned_ticket_and_only_to_the_pool():
    # the release endpoint's move: not one of the move endpoint's targets
    assert rules.allowed("assigned", HAND_BACK) == ("open",)
    for status in ("open", "resolved", "closed"):
        assert rules.allowed(status, HAND_BACK) == ()
    assert "open" not in rules.AGENT_TARGETS
    assert [pair for pair, m in rules.TRANSITIONS.items() if HAND_BACK in m.by] == [
        ("assigned", "open")
    ]


def test_models_and_serializers_take_their_choices_from_the_table():
    assert [value for value, _ in Ticket.Status.choices] == list(rules.STATUSES)
    assert list(rules.STATUSES) == serializers.STATUS_NAMES
    move_field = serializers.AgentTransitionSerializer().fields["status"]
    assert list(move_field.choices) == list(rules.AGENT_TARGETS)


@pytest.mark.smoke
async def test_the_schemas_enums_are_the_tables(make_client):
    schema = (await make_client().get("/api/schema/?format=json")).json()["components"]["schemas"]
    assert schema["TicketStatusEnum"]["enum"] == list(rules.STATUSES)
    assert schema["AgentMoveEnum"]["enum"] == list(rules.AGENT_TARGETS)


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("status", ["assigned", "resolved", "closed"])
async def test_a_refused_move_answers_the_tables_allowed_list(make_client, status):
    from tests.conftest import run_sync

    admin = await run_sync(create_user, staff=True)
    agent = await run_sync(create_user, agent=True)
    [ticket] = await run_sync(create_held, admin, agent, 1, status=status)
    asked = "closed" if status == "assigned" else "resolved"
    expected = rules.allowed(status, AGENT)
    if asked in expected:
        asked = "resolved"
    r = await make_client(agent.token).post(
        "/api/agent/tickets/", json={"ticket_id": ticket.pk, "status": asked}
    )
    assert r.status_code == 409, r.text
    assert r.json()["current_status"] == status
    assert r.json()["allowed"] == list(expected)


def test_the_readme_prints_the_table():
    text = README.read_text()
    found = re.search(r"<!-- rules:table -->\n(.*?)\n<!-- /rules:table -->", text, re.S)
    assert found, "README: no rules table"
    assert found.group(1) == rules.table_markdown()
