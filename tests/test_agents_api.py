"""The agents API: list with load, create (validated), deactivate (releases tickets)."""

import pytest

from support import services
from support.models import ApiToken as Token
from support.models import Ticket, TicketAssignment
from tests.conftest import create_tickets, create_user, run_sync

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.smoke
async def test_list_agents_with_assigned_count(admin_client, make_client, admin, agent):
    idle = await run_sync(create_user, agent=True)
    await run_sync(create_user)  # not an agent: not listed
    await run_sync(create_tickets, admin, 5)
    held = (await make_client(agent.token).get("/api/agent/tickets/")).json()
    await make_client(agent.token).post(
        "/api/agent/tickets/", json={"ticket_id": held[0]["id"], "status": "resolved"}
    )
    r = await admin_client.get("/api/agents/")
    assert r.status_code == 200
    assert r.json() == [
        {
            "id": agent.pk,
            "username": agent.username,
            "email": "",
            "is_active": True,
            "assigned_count": 4,
        },
        {
            "id": idle.pk,
            "username": idle.username,
            "email": "",
            "is_active": True,
            "assigned_count": 0,
        },
    ]


@pytest.mark.smoke
async def test_create_agent_who_can_then_log_in_and_fetch(admin_client, make_client):
    r = await admin_client.post(
        "/api/agents/",
        json={"username": "dana", "password": "correct-horse-battery", "email": "d@example.com"},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body == {
        "id": body["id"],
        "username": "dana",
        "email": "d@example.com",
        "is_active": True,
        "assigned_count": 0,
    }
    assert "password" not in r.text
    r = await make_client().post(
        "/api/auth/token/", json={"username": "dana", "password": "correct-horse-battery"}
    )
    assert r.status_code == 200
    r = await make_client(r.json()["token"]).get("/api/agent/tickets/")
    assert r.status_code == 200
    assert r.json() == []


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"username": "erin", "password": "short"}, "password"),
        ({"username": "erin", "password": "12345678901"}, "password"),
        ({"username": "erin", "password": "password123"}, "password"),
        ({"username": "erinrodriguez", "password": "erinrodriguez1"}, "password"),
        ({"username": "has space", "password": "correct-horse-battery"}, "username"),
        ({"username": "", "password": "correct-horse-battery"}, "username"),
        ({"username": "x" * 151, "password": "correct-horse-battery"}, "username"),
        ({"password": "correct-horse-battery"}, "username"),
        ({"username": "erin"}, "password"),
        ({"username": "erin", "password": "correct-horse-battery", "email": "nope"}, "email"),
    ],
)
async def test_create_agent_refuses_bad_fields(admin_client, payload, field):
    before = await services.User.objects.acount()
    r = await admin_client.post("/api/agents/", json=payload)
    assert r.status_code == 400
    assert field in r.json()
    assert await services.User.objects.acount() == before


async def test_create_agent_refuses_a_taken_username(admin_client, admin):
    r = await admin_client.post(
        "/api/agents/", json={"username": admin.username, "password": "correct-horse-battery"}
    )
    assert r.status_code == 400
    assert "username" in r.json()
    assert not await services.User.objects.filter(
        username=admin.username, groups__name="agents"
    ).aexists()


@pytest.mark.smoke
async def test_deactivate_releases_assigned_tickets_and_keeps_the_record(
    admin_client, make_client, admin, agent
):
    await run_sync(create_tickets, admin, 3)
    client = make_client(agent.token)
    held = (await client.get("/api/agent/tickets/")).json()
    await client.post(
        "/api/agent/tickets/", json={"ticket_id": held[0]["id"], "status": "resolved"}
    )

    r = await admin_client.delete(f"/api/agents/{agent.pk}/")
    assert r.status_code == 204

    user = await services.User.objects.aget(pk=agent.pk)
    assert user.is_active is False  # deactivated, not erased
    statuses = {t.pk: t.status async for t in Ticket.objects.all()}
    assert statuses[held[0]["id"]] == "resolved"
    assert statuses[held[1]["id"]] == statuses[held[2]["id"]] == "open"
    active = [a async for a in TicketAssignment.objects.filter(is_active=True)]
    assert [(a.ticket_id, a.agent_id) for a in active] == [(held[0]["id"], agent.pk)]
    assert not await Token.objects.filter(user_id=agent.pk).aexists()
    # the old token no longer works, and the listing shows the agent inactive
    assert (await client.get("/api/agent/tickets/")).status_code == 401
    listing = (await admin_client.get("/api/agents/")).json()
    assert listing == [
        {
            "id": agent.pk,
            "username": agent.username,
            "email": "",
            "is_active": False,
            "assigned_count": 0,
        }
    ]


async def test_released_tickets_go_to_the_next_agent(
    admin_client, make_client, admin, agent, other_agent
):
    await run_sync(create_tickets, admin, 15)
    held = (await make_client(agent.token).get("/api/agent/tickets/")).json()
    await admin_client.delete(f"/api/agents/{agent.pk}/")
    taken = (await make_client(other_agent.token).get("/api/agent/tickets/")).json()
    assert {t["id"] for t in taken} == {t["id"] for t in held}


async def test_deactivate_twice_is_idempotent(admin_client, agent):
    assert (await admin_client.delete(f"/api/agents/{agent.pk}/")).status_code == 204
    assert (await admin_client.delete(f"/api/agents/{agent.pk}/")).status_code == 204


async def test_deactivate_unknown_or_non_agent_is_404(admin_client, admin):
    assert (await admin_client.delete("/api/agents/999999/")).status_code == 404
    assert (await admin_client.delete(f"/api/agents/{admin.pk}/")).status_code == 404
    assert (await services.User.objects.aget(pk=admin.pk)).is_active
