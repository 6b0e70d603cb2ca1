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


# --- One agent: read, reactivate ------------------------------------------------------------
async def test_get_one_agent_has_the_shape_of_a_list_entry(admin_client, make_client, admin, agent):
    await run_sync(create_tickets, admin, 2)
    await make_client(agent.token).get("/api/agent/tickets/")
    r = await admin_client.get(f"/api/agents/{agent.pk}/")
    assert r.status_code == 200, r.text
    listing = (await admin_client.get("/api/agents/")).json()
    assert [r.json()] == listing
    assert r.json()["assigned_count"] == 2
    # a deactivated agent is still an agent: it is shown, inactive
    await admin_client.delete(f"/api/agents/{agent.pk}/")
    r = await admin_client.get(f"/api/agents/{agent.pk}/")
    assert r.status_code == 200
    assert (r.json()["is_active"], r.json()["assigned_count"]) == (False, 0)


async def test_get_one_agent_is_404_for_anyone_else(admin_client, admin):
    plain = await run_sync(create_user)
    for pk in (admin.pk, plain.pk, 999999, 2**31):
        r = await admin_client.get(f"/api/agents/{pk}/")
        assert r.status_code == 404, (pk, r.text)
        assert r.json() == {"detail": "No agent matches the given query."}


@pytest.mark.smoke
async def test_a_deactivated_agent_is_reactivated_and_works_again(
    admin_client, make_client, admin, agent
):
    await run_sync(create_tickets, admin, 2)
    held = (await make_client(agent.token).get("/api/agent/tickets/")).json()
    assert (await admin_client.delete(f"/api/agents/{agent.pk}/")).status_code == 204

    r = await admin_client.patch(f"/api/agents/{agent.pk}/", json={"is_active": True})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "id": agent.pk,
        "username": agent.username,
        "email": "",
        "is_active": True,
        "assigned_count": 0,  # what it held went back to the pool and stays there
    }
    assert (await services.User.objects.aget(pk=agent.pk)).is_active
    # its old token stays revoked; it logs in again and takes work
    assert (await make_client(agent.token).get("/api/agent/tickets/")).status_code == 401
    login = await make_client().post(
        "/api/auth/token/", json={"username": agent.username, "password": "pw-for-tests-1"}
    )
    assert login.status_code == 200, login.text
    again = await make_client(login.json()["token"]).get("/api/agent/tickets/")
    assert again.status_code == 200
    assert {t["id"] for t in again.json()} == {t["id"] for t in held}
    # reactivating an active agent changes nothing
    r = await admin_client.patch(f"/api/agents/{agent.pk}/", json={"is_active": True})
    assert (r.status_code, r.json()["is_active"], r.json()["assigned_count"]) == (200, True, 2)


async def test_patch_is_active_false_deactivates_as_delete_does(
    admin_client, make_client, admin, agent
):
    await run_sync(create_tickets, admin, 2)
    await make_client(agent.token).get("/api/agent/tickets/")
    r = await admin_client.patch(f"/api/agents/{agent.pk}/", json={"is_active": False})
    assert r.status_code == 200, r.text
    assert (r.json()["is_active"], r.json()["assigned_count"]) == (False, 0)
    assert await Ticket.objects.filter(status="open").acount() == 2
    assert not await Token.objects.filter(user_id=agent.pk).aexists()
    # an empty patch changes nothing and shows the agent
    r = await admin_client.patch(f"/api/agents/{agent.pk}/", json={})
    assert (r.status_code, r.json()["is_active"]) == (200, False)


async def test_patch_on_a_user_who_is_not_an_agent_is_404_and_changes_nothing(admin_client):
    plain = await run_sync(create_user)
    await run_sync(services.User.objects.filter(pk=plain.pk).update, is_active=False)
    r = await admin_client.patch(f"/api/agents/{plain.pk}/", json={"is_active": True})
    assert r.status_code == 404
    assert not (await services.User.objects.aget(pk=plain.pk)).is_active


# --- Usernames ignore case ------------------------------------------------------------------
@pytest.mark.smoke
async def test_a_username_differing_only_in_case_is_taken(admin_client):
    body = {"password": "correct-horse-battery"}
    assert (await admin_client.post("/api/agents/", json={**body, "username": "Alice"})).is_success
    for name in ("alice", "ALICE", "aLiCe"):
        r = await admin_client.post("/api/agents/", json={**body, "username": name})
        assert r.status_code == 400, (name, r.text)
        assert r.json() == {"username": [services.USERNAME_TAKEN]}
    names = [u async for u in services.User.objects.values_list("username", flat=True)]
    assert sorted(name.lower() for name in names).count("alice") == 1
