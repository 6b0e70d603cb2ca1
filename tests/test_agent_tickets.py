"""The agent endpoints: the top-up fetch and the agent's state machine."""

from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from support.models import Ticket, TicketAssignment
from tests.conftest import create_tickets, run_sync
from tests.invariants import held_ticket_ids

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.smoke
async def test_fetch_tops_up_to_the_cap_and_records_assignments(agent_client, admin, agent):
    await run_sync(create_tickets, admin, 20)
    r = await agent_client.get("/api/agent/tickets/")
    assert r.status_code == 200
    body = r.json()
    assert len(body) == 15
    assert all(t["status"] == "assigned" and t["assigned_to"] == agent.pk for t in body)
    assert {t["id"] for t in body} == await run_sync(held_ticket_ids, agent.pk)
    assert await Ticket.objects.filter(status="open").acount() == 5


async def test_fetch_again_with_nothing_changed_returns_same_set(agent_client, admin, agent):
    await run_sync(create_tickets, admin, 40)
    first = (await agent_client.get("/api/agent/tickets/")).json()
    second = (await agent_client.get("/api/agent/tickets/")).json()
    assert first == second
    assert await TicketAssignment.objects.acount() == 15


async def test_fetch_takes_highest_priority_then_oldest(agent_client, admin):
    def make():
        now = timezone.now()
        rows = []
        # (priority, age in minutes): ids are created in this order
        spec = [(0, 50), (3, 1), (1, 90), (3, 30), (2, 10), (1, 95), (0, 99)]
        for n, (priority, age) in enumerate(spec):
            rows.append(
                Ticket(
                    title=f"t{n}",
                    priority=priority,
                    created_by=admin,
                    created_at=now - timedelta(minutes=age),
                )
            )
        return Ticket.objects.bulk_create(rows)

    made = await run_sync(make)
    with override_settings(SUPPORT_AGENT_MAX_TICKETS=5):
        body = (await agent_client.get("/api/agent/tickets/")).json()
    picked = {t["title"] for t in body}
    # urgent (older first), high, then the two oldest normals; both lows stay in the pool
    assert picked == {"t3", "t1", "t4", "t5", "t2"}
    assert await Ticket.objects.filter(status="open").acount() == len(made) - 5


async def test_priority_ties_on_age_go_by_id(agent_client, admin):
    def make():
        same = timezone.now() - timedelta(hours=1)
        return Ticket.objects.bulk_create(
            Ticket(title=f"t{n}", created_by=admin, created_at=same) for n in range(4)
        )

    made = await run_sync(make)
    with override_settings(SUPPORT_AGENT_MAX_TICKETS=2):
        body = (await agent_client.get("/api/agent/tickets/")).json()
    assert [t["id"] for t in body] == [made[0].pk, made[1].pk]


async def test_list_is_ordered_by_assigned_at_then_id(agent_client, admin, agent):
    tickets = await run_sync(create_tickets, admin, 3)
    earlier = tickets[2]

    def hand_over_earlier():
        at = timezone.now() - timedelta(minutes=5)
        TicketAssignment.objects.create(ticket=earlier, agent=agent, assigned_at=at)
        Ticket.objects.filter(pk=earlier.pk).update(
            status="assigned", assigned_to=agent, assigned_at=at
        )

    await run_sync(hand_over_earlier)
    body = (await agent_client.get("/api/agent/tickets/")).json()
    # the earlier assignment first, then the two taken together, by id
    assert [t["id"] for t in body] == [tickets[2].pk, tickets[0].pk, tickets[1].pk]


async def test_fetch_with_empty_pool_returns_what_is_held(agent_client, admin):
    await run_sync(create_tickets, admin, 4)
    assert len((await agent_client.get("/api/agent/tickets/")).json()) == 4
    assert len((await agent_client.get("/api/agent/tickets/")).json()) == 4


async def test_resolving_frees_a_slot_that_the_next_fetch_fills(agent_client, admin):
    await run_sync(create_tickets, admin, 16)
    held = (await agent_client.get("/api/agent/tickets/")).json()
    r = await agent_client.post(
        "/api/agent/tickets/", json={"ticket_id": held[0]["id"], "status": "resolved"}
    )
    assert r.status_code == 200
    refreshed = (await agent_client.get("/api/agent/tickets/")).json()
    assert len(refreshed) == 15
    assert held[0]["id"] not in {t["id"] for t in refreshed}


# --- the state machine ----------------------------------------------------------------------
@pytest.mark.smoke
async def test_agent_moves_assigned_to_resolved_to_closed(agent_client, admin, agent):
    await run_sync(create_tickets, admin, 1)
    [ticket] = (await agent_client.get("/api/agent/tickets/")).json()
    r = await agent_client.post(
        "/api/agent/tickets/", json={"ticket_id": ticket["id"], "status": "resolved"}
    )
    assert r.status_code == 200
    assert (r.json()["status"], r.json()["assigned_to"]) == ("resolved", agent.pk)
    r = await agent_client.post(
        "/api/agent/tickets/", json={"ticket_id": ticket["id"], "status": "closed"}
    )
    assert r.status_code == 200
    assert r.json()["status"] == "closed"
    stored = await Ticket.objects.aget(pk=ticket["id"])
    assert stored.status == "closed"


@pytest.mark.parametrize(
    ("moves", "refused", "current", "allowed"),
    [
        ([], "closed", "assigned", ["resolved"]),
        (["resolved"], "resolved", "resolved", ["closed"]),
        (["resolved", "closed"], "closed", "closed", []),
        (["resolved", "closed"], "resolved", "closed", []),
    ],
)
async def test_moves_outside_the_state_machine_are_409(
    agent_client, admin, moves, refused, current, allowed
):
    await run_sync(create_tickets, admin, 1)
    [ticket] = (await agent_client.get("/api/agent/tickets/")).json()
    for move in moves:
        r = await agent_client.post(
            "/api/agent/tickets/", json={"ticket_id": ticket["id"], "status": move}
        )
        assert r.status_code == 200
    r = await agent_client.post(
        "/api/agent/tickets/", json={"ticket_id": ticket["id"], "status": refused}
    )
    assert r.status_code == 409
    body = r.json()
    assert body["current_status"] == current
    assert body["allowed"] == allowed
    assert current in body["detail"]
    assert (await Ticket.objects.aget(pk=ticket["id"])).status == current


@pytest.mark.parametrize("status", ["open", "assigned", "reopened", "", None, 3])
async def test_agent_may_only_ask_for_resolved_or_closed(agent_client, admin, status):
    await run_sync(create_tickets, admin, 1)
    [ticket] = (await agent_client.get("/api/agent/tickets/")).json()
    r = await agent_client.post(
        "/api/agent/tickets/", json={"ticket_id": ticket["id"], "status": status}
    )
    assert r.status_code == 400
    assert "status" in r.json()
    assert (await Ticket.objects.aget(pk=ticket["id"])).status == "assigned"


async def test_someone_elses_or_missing_ticket_is_404_alike(
    agent_client, make_client, admin, other_agent
):
    await run_sync(create_tickets, admin, 2)
    theirs = (await make_client(other_agent.token).get("/api/agent/tickets/")).json()
    r1 = await agent_client.post(
        "/api/agent/tickets/", json={"ticket_id": theirs[0]["id"], "status": "resolved"}
    )
    r2 = await agent_client.post(
        "/api/agent/tickets/", json={"ticket_id": 987654321, "status": "resolved"}
    )
    assert r1.status_code == r2.status_code == 404
    assert r1.json() == r2.json()
    assert (await Ticket.objects.aget(pk=theirs[0]["id"])).status == "assigned"


async def test_ticket_returned_to_pool_is_no_longer_the_agents(agent_client, admin_client, admin):
    await run_sync(create_tickets, admin, 1)
    [ticket] = (await agent_client.get("/api/agent/tickets/")).json()
    await admin_client.patch(f"/api/tickets/{ticket['id']}/", json={"status": "open"})
    r = await agent_client.post(
        "/api/agent/tickets/", json={"ticket_id": ticket["id"], "status": "resolved"}
    )
    assert r.status_code == 404


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"status": "resolved"},
        {"ticket_id": "abc", "status": "resolved"},
        {"ticket_id": -1, "status": "resolved"},
        {"ticket_id": 0, "status": "resolved"},
        {"ticket_id": 2**63, "status": "resolved"},
    ],
)
async def test_missing_or_ill_typed_fields_are_400(agent_client, payload):
    r = await agent_client.post("/api/agent/tickets/", json=payload)
    assert r.status_code == 400
    assert set(r.json()) <= {"ticket_id", "status"}
