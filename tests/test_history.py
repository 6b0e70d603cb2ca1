"""Ticket history: every change leaves its event, in the same transaction, readable by admins
and by the agent that holds the ticket."""

import asyncio

import pytest
from django.test import override_settings

from support.models import TicketEvent
from tests.conftest import create_tickets, create_user, run_sync
from tests.invariants import assert_invariants, history_violations

pytestmark = pytest.mark.django_db(transaction=True)


def _compact(events):
    return [
        (e["kind"], e["actor"], e["from_status"], e["to_status"], e["agent"], e["changes"])
        for e in events
    ]


@pytest.mark.smoke
async def test_a_ticket_walked_through_its_whole_life_has_its_whole_history(
    admin_client, make_client, admin, agent, other_agent
):
    alice, bob = make_client(agent.token), make_client(other_agent.token)
    created = await admin_client.post(
        "/api/tickets/", json={"title": "Printer", "description": "jams", "priority": "high"}
    )
    pk = created.json()["id"]
    url = f"/api/tickets/{pk}/"

    await alice.get("/api/agent/tickets/")  # taken by alice's fetch
    await admin_client.patch(url, json={"title": "Printer jams", "priority": "urgent"})
    await admin_client.patch(url, json={"assigned_to": other_agent.pk})  # to bob
    await bob.post("/api/agent/tickets/", json={"ticket_id": pk, "status": "resolved"})
    await admin_client.patch(url, json={"status": "assigned"})  # reopened, still bob's
    await admin_client.patch(url, json={"status": "open"})  # back to the pool
    await alice.get("/api/agent/tickets/")  # alice takes it again
    await admin_client.delete(f"/api/agents/{agent.pk}/")  # alice leaves: released
    refused = await admin_client.patch(url, json={"status": "closed"})  # no agent: 409
    assert refused.status_code == 409

    r = await admin_client.get(f"{url}history/")
    assert r.status_code == 200
    events = r.json()
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)  # oldest first
    assert all(e["at"].endswith("Z") for e in events)
    a, b, boss = agent.pk, other_agent.pk, admin.pk
    assert _compact(events) == [
        (
            "created",
            boss,
            None,
            "open",
            None,
            {"title": [None, "Printer"], "description": [None, "jams"], "priority": [None, "high"]},
        ),
        (
            "assigned",
            a,
            "open",
            "assigned",
            a,
            {"assigned_to": [None, a], "status": ["open", "assigned"]},
        ),
        (
            "edited",
            boss,
            "assigned",
            "assigned",
            a,
            {"title": ["Printer", "Printer jams"], "priority": ["high", "urgent"]},
        ),
        ("reassigned", boss, "assigned", "assigned", b, {"assigned_to": [a, b]}),
        ("status_changed", b, "assigned", "resolved", b, {"status": ["assigned", "resolved"]}),
        ("status_changed", boss, "resolved", "assigned", b, {"status": ["resolved", "assigned"]}),
        (
            "released",
            boss,
            "assigned",
            "open",
            b,
            {"status": ["assigned", "open"], "assigned_to": [b, None]},
        ),
        (
            "assigned",
            a,
            "open",
            "assigned",
            a,
            {"assigned_to": [None, a], "status": ["open", "assigned"]},
        ),
        (
            "released",
            boss,
            "assigned",
            "open",
            a,
            {"assigned_to": [a, None], "status": ["assigned", "open"]},
        ),
    ]
    assert await run_sync(history_violations) == []

    # deleting is an event too, and the history outlives the ticket (for admins)
    assert (await admin_client.delete(url)).status_code == 204
    after = (await admin_client.get(f"{url}history/")).json()
    assert after[:-1] == events
    assert _compact(after[-1:]) == [("deleted", boss, "open", None, None, {})]


async def test_refused_changes_leave_no_event(admin_client, agent_client, admin, agent):
    [ticket] = await run_sync(create_tickets, admin, 1)
    with override_settings(SUPPORT_AGENT_MAX_TICKETS=0):
        assert (await agent_client.get("/api/agent/tickets/")).json() == []
        r = await admin_client.patch(f"/api/tickets/{ticket.pk}/", json={"assigned_to": agent.pk})
        assert r.status_code == 409
    for body in ({"status": "resolved"}, {"status": "nope"}, {"assigned_to": 999_999}):
        r = await admin_client.patch(f"/api/tickets/{ticket.pk}/", json=body)
        assert r.status_code in (400, 409)
    r = await agent_client.post(
        "/api/agent/tickets/", json={"ticket_id": ticket.pk, "status": "resolved"}
    )
    assert r.status_code == 404
    assert await TicketEvent.objects.acount() == 0
    # an edit that changes nothing records nothing either
    await admin_client.patch(f"/api/tickets/{ticket.pk}/", json={"title": ticket.title})
    assert await TicketEvent.objects.acount() == 0


async def test_holder_may_read_the_history_and_other_agents_may_not(
    make_client, admin, agent, other_agent
):
    await run_sync(create_tickets, admin, 1)
    [held] = (await make_client(agent.token).get("/api/agent/tickets/")).json()
    url = f"/api/tickets/{held['id']}/history/"
    r = await make_client(agent.token).get(url)
    assert r.status_code == 200
    assert [e["kind"] for e in r.json()] == ["assigned"]
    assert (await make_client(other_agent.token).get(url)).status_code == 404
    # the record holder of a resolved ticket still reads it
    await make_client(agent.token).post(
        "/api/agent/tickets/", json={"ticket_id": held["id"], "status": "resolved"}
    )
    assert (await make_client(agent.token).get(url)).status_code == 200


async def test_history_of_an_unknown_ticket_is_404_and_of_a_silent_one_empty(admin_client, admin):
    assert (await admin_client.get("/api/tickets/987654/history/")).status_code == 404
    [ticket] = await run_sync(create_tickets, admin, 1)  # made outside the API: no events
    r = await admin_client.get(f"/api/tickets/{ticket.pk}/history/")
    assert r.status_code == 200
    assert r.json() == []


async def test_concurrent_life_keeps_history_and_state_in_step(make_client, admin_client, admin):
    await run_sync(create_tickets, admin, 40)
    agents = [await run_sync(create_user, agent=True) for _ in range(3)]
    clients = [make_client(a.token) for a in agents]
    held = await asyncio.gather(*(c.get("/api/agent/tickets/") for c in clients))
    ids = [[t["id"] for t in r.json()] for r in held]
    calls = []
    for i, client in enumerate(clients):
        for pk in ids[i][:3]:
            calls.append(
                client.post("/api/agent/tickets/", json={"ticket_id": pk, "status": "resolved"})
            )
        calls.append(client.get("/api/agent/tickets/"))
        calls.append(admin_client.patch(f"/api/tickets/{ids[i][4]}/", json={"status": "open"}))
        calls.append(
            admin_client.patch(f"/api/tickets/{ids[i][5]}/", json={"assigned_to": agents[i - 1].pk})
        )
    responses = await asyncio.gather(*calls)
    assert all(r.status_code < 500 for r in responses)
    await run_sync(assert_invariants)  # includes the history replay
