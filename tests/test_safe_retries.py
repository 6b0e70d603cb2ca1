"""Safe to retry, safe to edit at once: Idempotency-Key on every POST that changes something,
ETag and If-Match on every ticket write (support.api.idempotency, support.api.conditional).

Concurrency here is real: parallel requests through the ASGI app (each on its own request
thread and pooled connection), a uvicorn server for the lost answer, and a second PostgreSQL
session holding locks; every transaction commits.
"""

import asyncio
import contextlib
import itertools
import json
import socket
import threading
import time
from datetime import timedelta

import httpx
import psycopg
import pytest
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from support.api import idempotency
from support.models import IdempotencyKey, Ticket, TicketEvent
from tests.conftest import (
    create_held,
    create_tickets,
    create_user,
    db_state,
    run_sync,
    until_a_lock_wait,
)
from tests.invariants import assert_invariants
from tests.servers import psycopg_conninfo, run_uvicorn

pytestmark = pytest.mark.django_db(transaction=True)


def keyed(key: str, **headers) -> dict:
    return {"Idempotency-Key": key, **headers}


def ticket_count(title: str) -> int:
    return Ticket.objects.filter(title=title).count()


async def events_of(ticket_id: int) -> list[str]:
    kinds = TicketEvent.objects.filter(ticket_id=ticket_id).order_by("id").values_list("kind")
    return [kind async for (kind,) in kinds]


# --- Idempotency-Key ------------------------------------------------------------------------
@pytest.mark.smoke
async def test_a_repeated_keyed_create_answers_the_first_answer_without_a_second_ticket(
    admin_client,
):
    first = await admin_client.post("/api/tickets/", json={"title": "once"}, headers=keyed("k1"))
    assert first.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    again = await admin_client.post("/api/tickets/", json={"title": "once"}, headers=keyed("k1"))
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    assert again.headers["ETag"] == first.headers["ETag"]
    assert again.headers["content-type"] == "application/json"
    assert await run_sync(ticket_count, "once") == 1
    # the same data in another key order and spacing is the same request
    reordered = '{ "description": "",  "title": "once" }'
    same = await admin_client.post(
        "/api/tickets/",
        content=json.dumps({"title": "once"}),
        headers=keyed("k2", **{"content-type": "application/json"}),
    )
    assert same.status_code == 201
    assert await run_sync(ticket_count, "once") == 2
    replay = await admin_client.post(
        "/api/tickets/",
        content=reordered.replace(' "description": "", ', " "),
        headers=keyed("k2", **{"content-type": "application/json"}),
    )
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert replay.json() == same.json()


@pytest.mark.smoke
async def test_the_same_key_for_another_request_is_422_and_changes_nothing(admin_client):
    await admin_client.post("/api/tickets/", json={"title": "first"}, headers=keyed("k"))
    before = await run_sync(db_state)
    for other in (
        admin_client.post("/api/tickets/", json={"title": "second"}, headers=keyed("k")),
        admin_client.post(
            "/api/agents/",
            json={"username": "x", "password": "long-enough-pw-1"},
            headers=keyed("k"),
        ),
    ):
        r = await other
        assert r.status_code == 422
        assert r.headers["content-type"] == "application/json"
        assert "another request" in r.json()["detail"]
    assert await run_sync(db_state) == before


async def test_keys_belong_to_their_user(make_client):
    alice, bob = [await run_sync(create_user, staff=True) for _ in range(2)]
    a = await make_client(alice.token).post(
        "/api/tickets/", json={"title": "mine"}, headers=keyed("shared")
    )
    b = await make_client(bob.token).post(
        "/api/tickets/", json={"title": "mine"}, headers=keyed("shared")
    )
    assert a.status_code == b.status_code == 201
    assert "Idempotent-Replayed" not in b.headers
    assert a.json()["id"] != b.json()["id"]
    assert b.json()["created_by"] == bob.pk
    # another body under the same key is still Bob's own new request, not Alice's 422
    c = await make_client(bob.token).post(
        "/api/tickets/", json={"title": "other"}, headers=keyed("bob's")
    )
    assert c.status_code == 201
    d = await make_client(alice.token).post(
        "/api/tickets/", json={"title": "different"}, headers=keyed("bob's")
    )
    assert d.status_code == 201
    assert "Idempotent-Replayed" not in d.headers


async def test_a_refusal_is_stored_so_a_retry_cannot_turn_it_into_a_success(
    agent_client, admin, agent
):
    [ticket] = await run_sync(create_held, admin, agent, 1, status="resolved")
    body = {"ticket_id": ticket.pk, "status": "resolved"}  # resolved -> resolved: refused
    first = await agent_client.post("/api/agent/tickets/", json=body, headers=keyed("m"))
    assert first.status_code == 409
    again = await agent_client.post("/api/agent/tickets/", json=body, headers=keyed("m"))
    assert again.status_code == 409
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    # a 400 is stored too
    bad = await agent_client.post("/api/agent/tickets/", json={"status": "x"}, headers=keyed("b"))
    assert bad.status_code == 400
    replay = await agent_client.post(
        "/api/agent/tickets/", json={"status": "x"}, headers=keyed("b")
    )
    assert (replay.status_code, replay.headers["Idempotent-Replayed"]) == (400, "true")


@pytest.mark.parametrize("value", ["", " ", "é", "a b", "x" * 256, '""', "tab\there"])
async def test_a_malformed_key_is_400_and_changes_nothing(admin_client, value):
    before = await run_sync(db_state)
    r = await admin_client.post(
        "/api/tickets/", json={"title": "t"}, headers={"Idempotency-Key": value.encode()}
    )
    assert r.status_code == 400
    assert "Idempotency-Key" in r.json()
    assert await run_sync(db_state) == before


async def test_a_quoted_key_is_the_same_key(admin_client):
    r1 = await admin_client.post("/api/tickets/", json={"title": "q"}, headers=keyed('"abc"'))
    r2 = await admin_client.post("/api/tickets/", json={"title": "q"}, headers=keyed("abc"))
    assert r2.headers["Idempotent-Replayed"] == "true"
    assert r2.json() == r1.json()


async def test_refusals_before_the_work_are_not_stored(make_client, agent):
    """A key on a request the checks refuse (no token, wrong role) stores nothing: the caller
    is not known, or the request never ran."""
    anonymous = await make_client().post("/api/tickets/", json={"title": "t"}, headers=keyed("a"))
    assert anonymous.status_code == 401
    wrong_role = await make_client(agent.token).post(
        "/api/tickets/", json={"title": "t"}, headers=keyed("a")
    )
    assert wrong_role.status_code == 403
    assert await IdempotencyKey.objects.acount() == 0


async def test_other_methods_ignore_the_key(admin_client, admin):
    [ticket] = await run_sync(create_tickets, admin, 1)
    for title in ("one", "two"):
        r = await admin_client.patch(
            f"/api/tickets/{ticket.pk}/", json={"title": title}, headers=keyed("p")
        )
        assert r.status_code == 200
        assert "Idempotent-Replayed" not in r.headers
    assert await IdempotencyKey.objects.acount() == 0


async def test_every_changing_post_takes_a_key(make_client, admin_client, admin, agent):
    """Agent create, release and logout replay their first answer too."""
    body = {"username": "keyed-agent", "password": "long-enough-pw-1"}
    created = [
        await admin_client.post("/api/agents/", json=body, headers=keyed("a")) for _ in range(2)
    ]
    assert [r.status_code for r in created] == [201, 201]
    assert created[1].json() == created[0].json()
    assert created[1].headers["Idempotent-Replayed"] == "true"

    [ticket] = await run_sync(create_held, admin, agent, 1)
    client = make_client(agent.token)
    released = [
        await client.post(f"/api/agent/tickets/{ticket.pk}/release/", headers=keyed("r"))
        for _ in range(2)
    ]
    assert [r.status_code for r in released] == [200, 200]
    assert released[1].json() == released[0].json()
    assert released[0].json()["status"] == "open"
    assert await events_of(ticket.pk) == ["released"]

    logout = [await client.post("/api/auth/logout/", headers=keyed("bye")) for _ in range(2)]
    assert [r.status_code for r in logout] == [204, 204]
    assert logout[1].headers["Idempotent-Replayed"] == "true"
    assert logout[1].content == b""
    # the revoked token serves that logout's retry only: nothing else, no other key
    assert (await client.get("/api/agent/tickets/")).status_code == 401
    other = await client.post("/api/auth/logout/", headers=keyed("another"))
    assert other.status_code == 401
    assert (await client.post("/api/auth/logout/")).status_code == 401


async def test_an_expired_key_is_a_new_request_and_the_purge_removes_only_expired_keys(
    admin_client,
):
    first = await admin_client.post("/api/tickets/", json={"title": "e"}, headers=keyed("old"))
    await admin_client.post("/api/tickets/", json={"title": "f"}, headers=keyed("live"))
    await IdempotencyKey.objects.filter(key="old").aupdate(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    again = await admin_client.post("/api/tickets/", json={"title": "e"}, headers=keyed("old"))
    assert again.status_code == 201
    assert "Idempotent-Replayed" not in again.headers
    assert again.json()["id"] != first.json()["id"]
    await IdempotencyKey.objects.filter(key="old").aupdate(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert await run_sync(idempotency.purge_expired, batch=1) == 1
    assert [k async for k in IdempotencyKey.objects.values_list("key", flat=True)] == ["live"]


async def test_the_purge_never_waits_for_a_key_in_use(admin_client):
    for n in range(3):
        await admin_client.post("/api/tickets/", json={"title": f"p{n}"}, headers=keyed(f"p{n}"))
    await IdempotencyKey.objects.aupdate(expires_at=timezone.now() - timedelta(seconds=1))
    with psycopg.connect(psycopg_conninfo("retries-test-locker")) as locker:
        locker.execute("SELECT 1 FROM support_idempotency_key WHERE key = 'p1' FOR UPDATE")
        started = time.monotonic()
        assert await run_sync(idempotency.purge_expired) == 2
        assert time.monotonic() - started < 1.0  # it skipped the locked row (lock_timeout: 3 s)
    assert [k async for k in IdempotencyKey.objects.values_list("key", flat=True)] == ["p1"]


# --- Idempotency-Key under concurrency ------------------------------------------------------
async def test_a_repeat_while_the_first_still_runs_is_409_with_retry_after(make_client):
    """The first request is held at its commit (its foreign-key check waits for a lock on the
    admin's row held by another session); repeats meanwhile are 409, then the first answers
    201 and a repeat gets that answer."""
    admin = await run_sync(create_user, staff=True)
    client = make_client(admin.token)
    with psycopg.connect(psycopg_conninfo("retries-test-locker")) as locker:
        locker.execute("SELECT 1 FROM auth_user WHERE id = %s FOR UPDATE", [admin.pk])
        first = asyncio.create_task(
            client.post("/api/tickets/", json={"title": "held"}, headers=keyed("h"))
        )
        await until_a_lock_wait(locker)  # the first reached its commit
        repeats = await asyncio.gather(
            *(
                client.post("/api/tickets/", json={"title": "held"}, headers=keyed("h"))
                for _ in range(5)
            )
        )
        for r in repeats:
            assert r.status_code == 409, r.text
            assert r.headers["Retry-After"] == "1"
            assert "still running" in r.json()["detail"]
        locker.rollback()  # the first one goes on
        answer = await first
    assert answer.status_code == 201
    replay = await client.post("/api/tickets/", json={"title": "held"}, headers=keyed("h"))
    assert replay.status_code == 201
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.content == answer.content
    assert await run_sync(ticket_count, "held") == 1


def test_fifty_concurrent_repeats_of_one_keyed_create_make_exactly_one_ticket(transactional_db):
    """Through uvicorn (two workers, so two processes race for the key): fifty connections
    released at once by a barrier send the same keyed create."""
    admin = create_user(staff=True)
    headers = {"Authorization": f"Token {admin.token}", "Idempotency-Key": "fifty"}
    answers = [None] * 50
    with run_uvicorn(workers=2) as server:
        barrier = threading.Barrier(50)

        def send(n):
            with httpx.Client(base_url=server.base_url, timeout=30) as client:
                client.get("/healthz")  # connected before the barrier
                barrier.wait()
                answers[n] = client.post("/api/tickets/", json={"title": "fifty"}, headers=headers)

        threads = [threading.Thread(target=send, args=(n,)) for n in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        created = [r for r in answers if r.status_code == 201]
        in_flight = [r for r in answers if r.status_code == 409]
        assert len(created) + len(in_flight) == 50, [r.status_code for r in answers]
        assert all(r.headers["Retry-After"] == "1" for r in in_flight)
        assert all("still running" in r.json()["detail"] for r in in_flight)
        assert len({r.content for r in created}) == 1  # one answer, the ticket's
        assert sum("Idempotent-Replayed" not in r.headers for r in created) == 1
        # once it has answered, every repeat gets its answer
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            late = [
                client.post("/api/tickets/", json={"title": "fifty"}, headers=headers)
                for _ in range(5)
            ]
        assert {(r.status_code, r.content) for r in late} == {(201, created[0].content)}
    assert ticket_count("fifty") == 1
    [ticket_id] = {r.json()["id"] for r in created}
    kinds = TicketEvent.objects.filter(ticket_id=ticket_id).values_list("kind", flat=True)
    assert list(kinds) == ["created"]
    assert_invariants()


def test_a_keyed_move_retried_after_its_answer_was_lost_gets_the_first_answer(transactional_db):
    """Through uvicorn: the client sends the move and hangs up before the answer; the move
    happens. Its retry with the key answers that move's 200 (a retry without one: 409)."""
    admin = create_user(staff=True)
    agent = create_user(agent=True)
    [ticket] = create_held(admin, agent, 1)
    body = json.dumps({"ticket_id": ticket.pk, "status": "resolved"}).encode()
    with run_uvicorn(workers=1) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(
                b"POST /api/agent/tickets/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Authorization: Token " + agent.token.encode() + b"\r\n"
                b"Idempotency-Key: lost-1\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            deadline = time.monotonic() + 10
            while not IdempotencyKey.objects.filter(key="lost-1").exists():
                assert time.monotonic() < deadline, server.log_tail()
                time.sleep(0.05)
        # the connection closed with the answer unread: lost
        stored = IdempotencyKey.objects.get(key="lost-1")
        assert stored.status == 200
        headers = {"Authorization": f"Token {agent.token}"}
        retry = httpx.post(
            f"{server.base_url}/api/agent/tickets/",
            content=body,
            headers={**headers, "Idempotency-Key": "lost-1", "Content-Type": "application/json"},
        )
        assert retry.status_code == 200
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert retry.json()["status"] == "resolved"
        assert retry.content.decode() == stored.body
        unkeyed = httpx.post(
            f"{server.base_url}/api/agent/tickets/",
            content=body,
            headers={**headers, "Content-Type": "application/json"},
        )
        assert unkeyed.status_code == 409
    assert list(TicketEvent.objects.filter(ticket_id=ticket.pk).values_list("kind", flat=True)) == [
        "status_changed"
    ]


async def test_a_failure_stores_nothing_and_its_retry_runs_anew(make_client, admin, agent):
    """A lock wait that times out (503) rolls the key back with the effect."""
    [ticket] = await run_sync(create_held, admin, agent, 1)
    client = make_client(agent.token)
    body = {"ticket_id": ticket.pk, "status": "resolved"}
    with psycopg.connect(psycopg_conninfo("retries-test-locker")) as locker:
        locker.execute("SELECT 1 FROM auth_user WHERE id = %s FOR UPDATE", [agent.pk])
        failed = await client.post("/api/agent/tickets/", json=body, headers=keyed("f"))
        assert failed.status_code == 503
    assert await IdempotencyKey.objects.acount() == 0
    retry = await client.post("/api/agent/tickets/", json=body, headers=keyed("f"))
    assert retry.status_code == 200
    assert "Idempotent-Replayed" not in retry.headers
    assert retry.json()["status"] == "resolved"


# --- ETag, If-None-Match, If-Match ----------------------------------------------------------
@pytest.mark.smoke
async def test_every_ticket_answer_has_an_etag_that_changes_with_every_change(
    admin_client, make_client, admin
):
    agent = await run_sync(create_user, agent=True)
    created = await admin_client.post("/api/tickets/", json={"title": "v"})
    ticket_id = created.json()["id"]
    assert created.headers["ETag"] == f'"{ticket_id}.1"'
    assert created.json()["version"] == 1
    got = await admin_client.get(f"/api/tickets/{ticket_id}/")
    assert got.headers["ETag"] == created.headers["ETag"]
    fetched = await make_client(agent.token).get("/api/agent/tickets/")  # assigned by a fetch
    assert [t["version"] for t in fetched.json()] == [2]
    after_fetch = await admin_client.get(f"/api/tickets/{ticket_id}/")
    assert after_fetch.headers["ETag"] == f'"{ticket_id}.2"'
    moved = await make_client(agent.token).post(
        "/api/agent/tickets/", json={"ticket_id": ticket_id, "status": "resolved"}
    )
    assert moved.headers["ETag"] == f'"{ticket_id}.3"'
    edited = await admin_client.patch(f"/api/tickets/{ticket_id}/", json={"title": "w"})
    assert edited.headers["ETag"] == f'"{ticket_id}.4"'
    assert edited.json()["version"] == 4
    unchanged = await admin_client.patch(f"/api/tickets/{ticket_id}/", json={"title": "w"})
    assert unchanged.headers["ETag"] == f'"{ticket_id}.4"'  # nothing changed, same version
    listed = await admin_client.get("/api/tickets/")
    assert [t["version"] for t in listed.json()["results"]] == [4]


@pytest.mark.smoke
async def test_if_none_match_answers_304_while_the_ticket_is_unchanged(admin_client, admin):
    [ticket] = await run_sync(create_tickets, admin, 1)
    url = f"/api/tickets/{ticket.pk}/"
    etag = (await admin_client.get(url)).headers["ETag"]
    for value in (etag, f'"x", {etag}', f"W/{etag}", "*"):
        r = await admin_client.get(url, headers={"If-None-Match": value})
        assert r.status_code == 304, value
        assert r.content == b""
        assert r.headers["ETag"] == etag
    await admin_client.patch(url, json={"priority": "high"})
    r = await admin_client.get(url, headers={"If-None-Match": etag})
    assert r.status_code == 200
    assert r.json()["priority"] == "high"
    assert r.headers["ETag"] != etag


@pytest.mark.smoke
async def test_a_stale_if_match_is_412_with_the_current_etag_and_changes_nothing(
    admin_client, admin
):
    [ticket] = await run_sync(create_tickets, admin, 1)
    url = f"/api/tickets/{ticket.pk}/"
    old = (await admin_client.get(url)).headers["ETag"]
    current = (await admin_client.patch(url, json={"title": "new"})).headers["ETag"]
    before = await run_sync(db_state)
    for method, kwargs in (
        ("PATCH", {"json": {"title": "lost update"}}),
        ("PUT", {"json": {"title": "lost update", "status": "open"}}),
        ("PATCH", {"json": {"title": "x" * 1000}}),  # stale first, whatever the body
        ("DELETE", {}),
    ):
        for stale in (old, f"W/{current}", '"999.2"', f'"{ticket.pk}.x"'):
            r = await admin_client.request(method, url, headers={"If-Match": stale}, **kwargs)
            assert r.status_code == 412, (method, stale, r.text)
            assert r.headers["ETag"] == current
            assert r.headers["content-type"] == "application/json"
    assert await run_sync(db_state) == before
    ok = await admin_client.patch(
        url, json={"title": "newer"}, headers={"If-Match": f'"0.1", {current}'}
    )
    assert ok.status_code == 200
    assert (await admin_client.delete(url, headers={"If-Match": "*"})).status_code == 204


async def test_the_agents_move_and_hand_back_honour_if_match(make_client, admin, agent):
    tickets = await run_sync(create_held, admin, agent, 2)
    client = make_client(agent.token)
    [a, b] = [t.pk for t in tickets]
    before = await run_sync(db_state)
    stale = await client.post(
        "/api/agent/tickets/",
        json={"ticket_id": a, "status": "resolved"},
        headers={"If-Match": f'"{a}.7"'},
    )
    assert stale.status_code == 412
    assert stale.headers["ETag"] == f'"{a}.1"'
    stale_release = await client.post(
        f"/api/agent/tickets/{b}/release/", headers={"If-Match": f'"{b}.0"'}
    )
    assert stale_release.status_code == 412
    assert await run_sync(db_state) == before
    moved = await client.post(
        "/api/agent/tickets/",
        json={"ticket_id": a, "status": "resolved"},
        headers={"If-Match": f'"{a}.1"'},
    )
    assert (moved.status_code, moved.headers["ETag"]) == (200, f'"{a}.2"')
    released = await client.post(
        f"/api/agent/tickets/{b}/release/", headers={"If-Match": f'"{b}.1"'}
    )
    assert (released.status_code, released.headers["ETag"]) == (200, f'"{b}.2"')
    # not the agent's ticket: 404 before the precondition
    other = await run_sync(create_tickets, admin, 1)
    r = await client.post(
        "/api/agent/tickets/",
        json={"ticket_id": other[0].pk, "status": "resolved"},
        headers={"If-Match": '"1.1"'},
    )
    assert r.status_code == 404


@pytest.mark.parametrize("value", ["abc", '"unterminated', "W/", '"a" "b"', ",", '"a" x'])
async def test_a_malformed_precondition_is_400_and_changes_nothing(admin_client, admin, value):
    [ticket] = await run_sync(create_tickets, admin, 1)
    url = f"/api/tickets/{ticket.pk}/"
    before = await run_sync(db_state)
    patched = await admin_client.patch(url, json={"title": "x"}, headers={"If-Match": value})
    assert patched.status_code == 400
    assert "If-Match" in patched.json()
    got = await admin_client.get(url, headers={"If-None-Match": value})
    assert got.status_code == 400
    assert "If-None-Match" in got.json()
    assert await run_sync(db_state) == before


@override_settings(SUPPORT_REQUIRE_IF_MATCH=True)
async def test_if_match_can_be_required_on_admin_writes(admin_client, admin, agent):
    [ticket] = await run_sync(create_tickets, admin, 1)
    url = f"/api/tickets/{ticket.pk}/"
    before = await run_sync(db_state)
    for method, kwargs in (
        ("PATCH", {"json": {"title": "x"}}),
        ("PUT", {"json": {"title": "x"}}),
        ("DELETE", {}),
    ):
        r = await admin_client.request(method, url, **kwargs)
        assert r.status_code == 428, method
        assert "If-Match" in r.json()["detail"]
    assert await run_sync(db_state) == before
    etag = (await admin_client.get(url)).headers["ETag"]
    ok = await admin_client.patch(url, json={"title": "x"}, headers={"If-Match": etag})
    assert ok.status_code == 200


async def test_two_admins_racing_with_one_if_match_one_wins_one_gets_412(make_client, admin):
    admins = [await run_sync(create_user, staff=True) for _ in range(2)]
    clients = [make_client(a.token) for a in admins]
    tickets = await run_sync(create_tickets, admin, 10)
    for ticket in tickets:
        url = f"/api/tickets/{ticket.pk}/"
        etag = (await clients[0].get(url)).headers["ETag"]
        answers = await asyncio.gather(
            *(
                c.patch(url, json={"title": f"by {n}"}, headers={"If-Match": etag})
                for n, c in enumerate(clients)
            )
        )
        assert sorted(r.status_code for r in answers) == [200, 412]
        [won] = [r for r in answers if r.status_code == 200]
        [lost] = [r for r in answers if r.status_code == 412]
        assert lost.headers["ETag"] == won.headers["ETag"]
        final = (await clients[0].get(url)).json()
        assert final["title"] == won.json()["title"]  # no lost update
        assert final["version"] == 2
        assert await events_of(ticket.pk) == ["edited"]


async def test_each_worker_purges_expired_keys_in_the_background(admin_client, monkeypatch):
    from support import housekeeping

    for n in range(3):
        await admin_client.post("/api/tickets/", json={"title": f"b{n}"}, headers=keyed(f"b{n}"))
    await IdempotencyKey.objects.exclude(key="b2").aupdate(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    monkeypatch.setattr(housekeeping, "PURGE_EVERY", 0.1)
    task = housekeeping._task
    if task is not None and not task.done():  # started with the old interval: start it again
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await admin_client.get("/api/tickets/")  # the first request on this loop starts the task
    deadline = time.monotonic() + 5
    while await IdempotencyKey.objects.acount() != 1:
        assert time.monotonic() < deadline, "the background purge never ran"
        await asyncio.sleep(0.05)
    assert [k async for k in IdempotencyKey.objects.values_list("key", flat=True)] == ["b2"]


def test_the_purge_command_deletes_expired_keys(admin):
    from io import StringIO

    from django.core.management import call_command

    now = timezone.now()
    for n, expires in enumerate([now - timedelta(seconds=1), now + timedelta(hours=1)]):
        IdempotencyKey.objects.create(
            user=admin, key=f"c{n}", fingerprint="0" * 64, status=201, expires_at=expires
        )
    out = StringIO()
    call_command("purge_idempotency_keys", stdout=out)
    assert out.getvalue().strip() == "Deleted 1 expired idempotency key(s)."
    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["c1"]


async def test_if_match_compares_entity_tags_as_strings(admin_client, make_client, admin, agent):
    """Strong comparison is of the opaque tags, character by character (RFC 9110 8.8.3.2):
    "12.01" is not "12.1", though both read as the same number."""
    [ticket] = await run_sync(create_tickets, admin, 1)
    [held] = await run_sync(create_held, admin, agent, 1)
    url = f"/api/tickets/{ticket.pk}/"
    assert (await admin_client.get(url)).headers["ETag"] == f'"{ticket.pk}.1"'
    before = await run_sync(db_state)
    for other in (f'"{ticket.pk}.01"', f'"{ticket.pk}.001"', f'"0{ticket.pk}.1"'):
        r = await admin_client.patch(url, json={"title": "x"}, headers={"If-Match": other})
        assert r.status_code == 412, (other, r.text)
        assert (await admin_client.delete(url, headers={"If-Match": other})).status_code == 412
    client = make_client(agent.token)
    moved = await client.post(
        "/api/agent/tickets/",
        json={"ticket_id": held.pk, "status": "resolved"},
        headers={"If-Match": f'"{held.pk}.01"'},
    )
    assert moved.status_code == 412
    released = await client.post(
        f"/api/agent/tickets/{held.pk}/release/", headers={"If-Match": f'"{held.pk}.01"'}
    )
    assert released.status_code == 412
    assert await run_sync(db_state) == before


async def test_a_keyed_logout_with_another_token_is_another_request(make_client, agent):
    """A logout revokes the token it is made with: the same key with another of the user's
    tokens is another request (422), never the first logout's 204 with that token still
    valid."""
    from support.tokens import token_issue

    second = await run_sync(token_issue, user_id=agent.pk)
    first = await make_client(agent.token).post("/api/auth/logout/", headers=keyed("out"))
    assert first.status_code == 204
    other = make_client(second)
    r = await other.post("/api/auth/logout/", headers=keyed("out"))
    assert r.status_code == 422, r.headers
    assert "another request" in r.json()["detail"]
    assert (await other.get("/api/agent/tickets/")).status_code == 200  # not revoked: said so
    # the first token's retry still gets its answer
    again = await make_client(agent.token).post("/api/auth/logout/", headers=keyed("out"))
    assert (again.status_code, again.headers["Idempotent-Replayed"]) == (204, "true")


async def test_a_refusal_of_the_caller_found_under_the_lock_is_not_stored(
    make_client, admin, agent
):
    """The service checks the caller again under its row lock; an agent deactivated meanwhile
    is refused 401 there, as the token check would have refused it. That refusal is about
    the caller, not the request: like the token check's, it is not stored, so once the agent
    is active again (logged in anew) the retry runs, and never replays a 401 (which would
    also lack its WWW-Authenticate)."""
    from support import services
    from support.tokens import token_issue

    [ticket] = await run_sync(create_held, admin, agent, 1)
    body = {"ticket_id": ticket.pk, "status": "resolved"}
    with psycopg.connect(psycopg_conninfo("retries-test-locker")) as locker:
        locker.execute("UPDATE auth_user SET is_active = false WHERE id = %s", [agent.pk])
        first = asyncio.create_task(
            make_client(agent.token).post("/api/agent/tickets/", json=body, headers=keyed("gone"))
        )
        await until_a_lock_wait(locker)  # past the token check, at the agent's lock
        locker.commit()
        refused = await first
    assert refused.status_code == 401, refused.text
    assert refused.headers["WWW-Authenticate"] == "Token"
    assert await IdempotencyKey.objects.acount() == 0
    await run_sync(services.agent_reactivate, agent_id=agent.pk)
    token = await run_sync(token_issue, user_id=agent.pk)
    retry = await make_client(token).post("/api/agent/tickets/", json=body, headers=keyed("gone"))
    assert retry.status_code == 200, retry.text
    assert "Idempotent-Replayed" not in retry.headers
    assert retry.json()["status"] == "resolved"


def _expired_keys(user, count: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO support_idempotency_key (user_id, key, fingerprint, status, body,"
            " headers, credential, created_at, expires_at)"
            " SELECT %s, 'old-' || n, repeat('0', 64), 201, repeat('x', 300), '{}', '',"
            " now() - interval '2 days', now() - interval '1 day'"
            " FROM generate_series(1, %s) AS n",
            [user.pk, count],
        )


async def test_a_backlog_of_expired_keys_never_holds_up_the_presence_flush(
    make_client, admin, monkeypatch
):
    """The purge shares the worker's housekeeping thread with the presence flush and the idle
    sweep: a backlog (a day of keys after the workers were down) is deleted a slice at a
    time, and the flush keeps its interval meanwhile, as the idle release counts on."""
    from support import housekeeping, presence

    await run_sync(_expired_keys, admin, 150_000)  # seconds of purging, in one go
    real_flush = presence.flush
    flushed = []

    def flush():
        flushed.append(time.monotonic())
        return real_flush()

    monkeypatch.setattr(presence, "flush", flush)
    monkeypatch.setattr(housekeeping, "PURGE_EVERY", 0.05)
    task = housekeeping._task
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    loop = asyncio.get_running_loop()
    with override_settings(SUPPORT_PRESENCE_FLUSH_SECONDS=0.2):
        flushed.append(time.monotonic())
        await make_client(admin.token).get("/api/tickets/")  # starts the task on this loop
        deadline = time.monotonic() + 60
        while await IdempotencyKey.objects.acount():
            assert time.monotonic() < deadline, "the background purge never finished"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # a flush or two after it
        housekeeping._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await housekeeping._task
        await loop.run_in_executor(housekeeping._executor, lambda: None)
    gaps = [later - earlier for earlier, later in itertools.pairwise(flushed)]
    assert len(gaps) >= 3
    assert max(gaps) < 1.2, [round(gap, 2) for gap in gaps]


async def test_if_none_match_guards_writes_and_if_match_guards_a_read(
    admin_client, make_client, admin, agent
):
    """RFC 9110 evaluates both on every method: If-None-Match on a write refuses the versions it
    names (``*``: every one, the ticket exists); If-Match on a read refuses any other."""
    [ticket] = await run_sync(create_tickets, admin, 1)
    url = f"/api/tickets/{ticket.pk}/"
    current = (await admin_client.get(url)).headers["ETag"]
    before = await run_sync(db_state)
    for value in ("*", current, f"W/{current}", f'"{ticket.pk}.9", {current}'):
        r = await admin_client.patch(url, json={"title": "x"}, headers={"If-None-Match": value})
        assert (r.status_code, r.headers.get("ETag")) == (412, current), value
    r = await admin_client.delete(url, headers={"If-None-Match": "*"})
    assert r.status_code == 412
    assert await run_sync(db_state) == before
    r = await admin_client.get(url, headers={"If-Match": f'"{ticket.pk}.9"'})
    assert (r.status_code, r.headers["ETag"]) == (412, current)
    r = await admin_client.get(url, headers={"If-Match": current})
    assert r.status_code == 200
    r = await admin_client.patch(
        url, json={"title": "y"}, headers={"If-None-Match": f'"{ticket.pk}.9"'}
    )
    assert r.status_code == 200
    [held] = await run_sync(create_held, admin, agent, 1)
    moved = await make_client(agent.token).post(
        "/api/agent/tickets/",
        json={"ticket_id": held.pk, "status": "resolved"},
        headers={"If-None-Match": f'"{held.pk}.1"'},
    )
    assert moved.status_code == 412
