"""Wait for work: GET /api/agent/tickets/?wait=N (support.live)."""

import asyncio
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest
from django.db import connection
from django.test import override_settings

from support import live
from support.models import Ticket
from tests.conftest import create_held, create_tickets, create_user, db_state, run_sync
from tests.servers import psycopg_conninfo, run_uvicorn

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
async def _listener_stopped():
    yield
    await live.stop()


async def until(condition, within: float = 10.0, every: float = 0.01):
    """Wait until ``condition()`` is true; fail after ``within`` seconds."""
    end = time.monotonic() + within
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(every)


async def waiting(count: int) -> None:
    pool = live.pool()
    await until(lambda: len(pool.waiting) == count)


async def timed_get(client, url):
    start = time.monotonic()
    r = await client.get(url)
    return r, time.monotonic() - start


@pytest.mark.smoke
async def test_deadline_answers_the_empty_list(agent_client):
    r, took = await timed_get(agent_client, "/api/agent/tickets/?wait=0.3")
    assert r.status_code == 200
    assert r.json() == []
    assert took >= 0.3


@pytest.mark.smoke
async def test_an_agent_holding_tickets_is_answered_at_once(agent_client, admin, agent):
    await run_sync(create_held, admin, agent, 2)
    r, took = await timed_get(agent_client, "/api/agent/tickets/?wait=30")
    assert r.status_code == 200
    assert len(r.json()) == 2
    assert took < 5


async def test_a_creation_wakes_the_waiter(agent_client, admin_client, agent):
    fetch = asyncio.create_task(timed_get(agent_client, "/api/agent/tickets/?wait=30"))
    await waiting(1)
    created = await admin_client.post("/api/tickets/", json={"title": "new work"})
    assert created.status_code == 201
    r, took = await fetch
    assert r.status_code == 200
    assert [t["id"] for t in r.json()] == [created.json()["id"]]
    assert r.json()[0]["assigned_to"] == agent.pk
    assert took < 10


async def test_a_release_wakes_the_waiter(agent_client, admin_client, admin, other_agent):
    (held,) = await run_sync(create_held, admin, other_agent, 1)
    fetch = asyncio.create_task(agent_client.get("/api/agent/tickets/?wait=30"))
    await waiting(1)
    r = await admin_client.patch(f"/api/tickets/{held.pk}/", json={"status": "open"})
    assert r.status_code == 200
    r = await fetch
    assert [t["id"] for t in r.json()] == [held.pk]


async def test_a_hand_back_wakes_the_waiter(agent_client, make_client, admin, other_agent):
    (held,) = await run_sync(create_held, admin, other_agent, 1)
    fetch = asyncio.create_task(agent_client.get("/api/agent/tickets/?wait=30"))
    await waiting(1)
    r = await make_client(other_agent.token).post(f"/api/agent/tickets/{held.pk}/release/")
    assert r.status_code == 200
    r = await fetch
    assert [t["id"] for t in r.json()] == [held.pk]


async def test_the_longest_waiter_is_served_first(make_client, admin_client):
    agents = [await run_sync(create_user, agent=True) for _ in range(3)]
    fetches = []
    for n, agent in enumerate(agents):
        client = make_client(agent.token)
        fetches.append(asyncio.create_task(client.get("/api/agent/tickets/?wait=30")))
        await waiting(n + 1)
    first = await admin_client.post("/api/tickets/", json={"title": "one"})
    r = await fetches[0]
    assert [t["id"] for t in r.json()] == [first.json()["id"]]
    assert not fetches[1].done()
    assert not fetches[2].done()
    second = await admin_client.post("/api/tickets/", json={"title": "two"})
    r = await fetches[1]
    assert [t["id"] for t in r.json()] == [second.json()["id"]]
    await waiting(1)
    assert not fetches[2].done()
    fetches[2].cancel()


async def test_many_tickets_wake_as_many_waiters_as_can_take_them(make_client, admin):
    agents = [await run_sync(create_user, agent=True) for _ in range(3)]
    fetches = []
    for n, agent in enumerate(agents):
        fetches.append(
            asyncio.create_task(make_client(agent.token).get("/api/agent/tickets/?wait=30"))
        )
        await waiting(n + 1)
    with override_settings(SUPPORT_AGENT_MAX_TICKETS=2):
        await run_sync(create_tickets, admin, 5)  # one statement: one notification of 5
        answers = [len((await fetch).json()) for fetch in fetches]
    assert sorted(answers) == [1, 2, 2]
    assert await Ticket.objects.filter(status="open").acount() == 0


@pytest.mark.parametrize("value", ["0", "-1", "60.001", "61", "abc", "nan", "inf", "1e3", ""])
async def test_a_bad_wait_is_400_and_changes_nothing(agent_client, admin, value):
    await run_sync(create_tickets, admin, 3)
    before = await run_sync(db_state)
    r = await agent_client.get(f"/api/agent/tickets/?wait={value}")
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert "wait" in r.json()
    assert await run_sync(db_state) == before


async def test_a_waiter_holds_no_thread_and_no_connection(make_client, monkeypatch, admin, agent):
    """Two request threads, twenty waiters: an agent with work is still answered at once, the
    waiters' hops return their connections, and creations then answer every waiter."""
    from django.db import connections

    from project.asgi import django_application
    from project.handler import RequestThreads

    threads = RequestThreads(size=2, wait_timeout=5.0)
    monkeypatch.setattr(django_application, "threads", threads)
    waiters = [await run_sync(create_user, agent=True) for _ in range(20)]
    await run_sync(create_held, admin, agent, 1)
    pool = connections["default"].pool

    def checked_out():
        stats = pool.get_stats()
        return stats["pool_size"] - stats["pool_available"]

    before = checked_out()  # the test's own connection
    fetches = [
        asyncio.create_task(make_client(w.token).get("/api/agent/tickets/?wait=30"))
        for w in waiters
    ]
    await waiting(20)
    # every thread idle (a thread is back once its last call ended, which may be just after
    # its request gave it back)
    await until(lambda: len(threads._idle) == threads.started)
    assert threads.started <= 2
    assert checked_out() == before
    r, took = await timed_get(make_client(agent.token), "/api/agent/tickets/")
    assert r.status_code == 200
    assert len(r.json()) == 1
    assert took < 2
    with override_settings(SUPPORT_AGENT_MAX_TICKETS=1):
        await run_sync(create_tickets, admin, 20)
        answers = await asyncio.gather(*fetches)
    assert sorted(len(a.json()) for a in answers) == [1] * 20
    assert len({a.json()[0]["id"] for a in answers}) == 20
    assert live.pool().queue == []


async def test_a_cancelled_waiter_leaves_nothing_behind(agent_client, make_client, admin):
    fetch = asyncio.create_task(agent_client.get("/api/agent/tickets/?wait=30"))
    await waiting(1)
    fetch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fetch
    assert live.pool().queue == []


async def test_a_woken_waiter_that_leaves_passes_its_wake_on():
    pool = live.pool()
    deadline = asyncio.get_running_loop().time() + 30
    first, second = pool.join(), pool.join()
    waits = [asyncio.create_task(pool.wait(w, deadline)) for w in (first, second)]
    await until(lambda: len(pool.waiting) == 2)
    pool.wake(1)
    assert first.woken.is_set()
    assert not second.woken.is_set()
    waits[0].cancel()  # gone before it could look at the pool
    with pytest.raises(asyncio.CancelledError):
        await waits[0]
    pool.leave(first)
    assert await waits[1] is True
    pool.leave(second)


async def test_tickets_entering_while_the_agent_looks_are_not_missed():
    """A wake that comes while the waiter looks at the pool makes it look again at once, and
    it is not given to a younger waiter."""
    pool = live.pool()
    deadline = asyncio.get_running_loop().time() + 30
    looking, younger = pool.join(), pool.join()
    younger_wait = asyncio.create_task(pool.wait(younger, deadline))
    await until(lambda: len(pool.waiting) == 1)
    pool.wake(1)  # a notification during the older one's top-up
    assert not younger.woken.is_set()
    assert await asyncio.wait_for(pool.wait(looking, deadline), 1) is True
    pool.leave(looking)
    younger_wait.cancel()
    with pytest.raises(asyncio.CancelledError):
        await younger_wait
    pool.leave(younger)
    assert pool.queue == []


def _listener_role(action: str) -> None:
    with connection.cursor() as cursor:
        if action == "create":
            cursor.execute("DROP ROLE IF EXISTS support_listener_test")
            cursor.execute("CREATE ROLE support_listener_test LOGIN PASSWORD 'listen'")
            cursor.execute("GRANT SELECT ON support_ticket_count TO support_listener_test")
        elif action == "drop":
            cursor.execute("REVOKE ALL ON support_ticket_count FROM support_listener_test")
            cursor.execute("DROP ROLE IF EXISTS support_listener_test")
        else:  # "block" / "allow" new sessions of the role, and end the present ones
            login = "LOGIN" if action == "allow" else "NOLOGIN"
            cursor.execute(f"ALTER ROLE support_listener_test {login}")
            if action == "block":
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE usename = 'support_listener_test'"
                )


def _listener_url() -> str:
    db = connection.settings_dict
    host = db["HOST"] or "localhost"
    return f"postgres://support_listener_test:listen@{host}:{db['PORT']}/{db['NAME']}"


async def test_listener_lost_waiters_poll_then_it_comes_back(make_client, admin_client):
    """The listening connection killed and refused: waiters are served by polling the pool
    through the app's own connections; once it can reopen, a creation wakes at once again."""
    await run_sync(_listener_role, "create")
    try:
        url = await run_sync(_listener_url)
        with override_settings(SUPPORT_LISTEN_DATABASE_URL=url, SUPPORT_WAIT_POLL_SECONDS=0.3):
            pool = live.pool()
            pool.start()
            await until(lambda: pool.listening)
            await run_sync(_listener_role, "block")
            await until(lambda: not pool.listening)

            agent = await run_sync(create_user, agent=True)
            fetch = asyncio.create_task(
                timed_get(make_client(agent.token), "/api/agent/tickets/?wait=30")
            )
            await waiting(1)
            created = await admin_client.post("/api/tickets/", json={"title": "while down"})
            r, took = await fetch
            assert [t["id"] for t in r.json()] == [created.json()["id"]]
            assert not pool.listening  # served by the fallback's look at the pool
            assert took < 5

            await run_sync(_listener_role, "allow")
            await until(lambda: pool.listening)
        # listening again, with a poll interval that could not explain a quick answer
        with override_settings(SUPPORT_LISTEN_DATABASE_URL=url, SUPPORT_WAIT_POLL_SECONDS=60):
            agent = await run_sync(create_user, agent=True)
            fetch = asyncio.create_task(
                timed_get(make_client(agent.token), "/api/agent/tickets/?wait=30")
            )
            await waiting(1)
            created = await admin_client.post("/api/tickets/", json={"title": "back"})
            r, took = await fetch
            assert [t["id"] for t in r.json()] == [created.json()["id"]]
            assert took < 5
    finally:
        await live.stop()
        await run_sync(_listener_role, "drop")


async def test_the_notification_is_sent_at_commit_only():
    """The counting trigger notifies when open tickets grow, and only if the transaction
    commits."""
    params = live.conninfo("test-listen")
    async with await psycopg.AsyncConnection.connect(**params, autocommit=True) as conn:
        await conn.execute("LISTEN support_pool")

        def write(commit: bool):
            from django.db import transaction

            admin = create_user(staff=True)
            try:
                with transaction.atomic():
                    create_tickets(admin, 3)
                    if not commit:
                        raise RuntimeError("roll back")
            except RuntimeError:
                pass

        await run_sync(write, False)
        got = [n async for n in conn.notifies(timeout=0.5)]
        assert got == []
        await run_sync(write, True)
        got = [n.payload async for n in conn.notifies(timeout=2, stop_after=1)]
        assert [payload.split()[0] for payload in got] == ["3"]


async def test_two_statements_putting_as_many_tickets_in_the_pool_notify_twice():
    """PostgreSQL delivers one of a transaction's identical notifications: the payload
    differs for each statement, so both counts reach the waiters."""
    params = live.conninfo("test-listen")
    async with await psycopg.AsyncConnection.connect(**params, autocommit=True) as conn:
        await conn.execute("LISTEN support_pool")

        def write():
            from django.db import transaction

            admin = create_user(staff=True)
            with transaction.atomic():
                create_tickets(admin, 2)
                create_tickets(admin, 2)

        await run_sync(write)
        got = [n.payload async for n in conn.notifies(timeout=2, stop_after=2)]
        assert [payload.split()[0] for payload in got] == ["2", "2"]


def _lock_open_tickets(conn) -> None:
    conn.execute("SELECT id FROM support_ticket WHERE status = 'open' FOR UPDATE")


async def test_a_ticket_skipped_while_locked_is_found_by_the_look_at_the_pool(agent_client, admin):
    """The waiter's top-up skips an open ticket someone holds locked (SKIP LOCKED) and no
    notification follows its unlocking: the listening connection's look at the pool, while
    waiters sleep, finds it."""
    (ticket,) = await run_sync(create_tickets, admin, 1)
    with override_settings(SUPPORT_WAIT_POLL_SECONDS=0.3):
        with psycopg.connect(psycopg_conninfo("test-locker")) as locker:
            _lock_open_tickets(locker)
            fetch = asyncio.create_task(timed_get(agent_client, "/api/agent/tickets/?wait=20"))
            await waiting(1)
            await asyncio.sleep(0.5)  # a look or two find the ticket, still locked
            assert not fetch.done()
        r, took = await fetch  # the lock is gone: the next look wakes the waiter
    assert [t["id"] for t in r.json()] == [ticket.pk]
    assert took < 5


async def test_a_wait_ends_at_its_deadline_even_when_woken_again_and_again():
    pool = live.pool()
    waiter = pool.join()
    waiter.woken.set()
    deadline = asyncio.get_running_loop().time() - 0.001
    assert await pool.wait(waiter, deadline) is False
    pool.leave(waiter)


def _waiting_agents(server) -> float:
    body = httpx.get(f"{server.base_url}/metrics").text
    (line,) = [x for x in body.splitlines() if x.startswith("support_waiting_agents ")]
    return float(line.split()[1])


def _eventually(condition, within: float = 10.0) -> None:
    end = time.monotonic() + within
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.02)


def test_a_client_that_goes_away_while_waiting_leaves_nothing_behind(agent):
    """Served by uvicorn: the client closes its connection mid-wait; the server drops the
    waiter at once and holds no database session for it (listening aside)."""
    with run_uvicorn(workers=1, env={"METRICS_PUBLIC": "1"}) as server:
        request = (
            "GET /api/agent/tickets/?wait=30 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Token {agent.token}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as client:
            client.sendall(request)
            _eventually(lambda: _waiting_agents(server) == 1)
        _eventually(lambda: _waiting_agents(server) == 0, within=2)
        with psycopg.connect(psycopg_conninfo()) as conn:
            busy = [s for s in server.sessions(conn) if s["state"] != "idle"]
            assert busy == []
        # and the worker still answers a waiting fetch to its deadline
        r = httpx.get(
            f"{server.base_url}/api/agent/tickets/?wait=0.2",
            headers={"Authorization": f"Token {agent.token}"},
        )
        assert r.status_code == 200
        assert r.json() == []


def test_a_stopping_worker_answers_its_waiters_at_once(agent):
    """SIGTERM (a restart): waiting fetches are answered with what they hold (nothing) at
    once instead of holding uvicorn's graceful shutdown and being cut off after it."""
    with run_uvicorn(workers=1, env={"METRICS_PUBLIC": "1"}) as server:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            headers = {"Authorization": f"Token {agent.token}"}

            def fetch():
                start = time.monotonic()
                r = client.get("/api/agent/tickets/?wait=60", headers=headers)
                return r, time.monotonic() - start

            with ThreadPoolExecutor(1) as pool:
                answer = pool.submit(fetch)
                _eventually(lambda: _waiting_agents(server) == 1)
                stopped_at = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                r, _ = answer.result(timeout=15)
                answered_in = time.monotonic() - stopped_at
        assert r.status_code == 200
        assert r.json() == []
        assert answered_in < 5
        server.proc.wait(timeout=15)


async def test_a_waiter_that_falls_asleep_during_a_quiet_spell_gets_the_next_look(
    agent_client, admin, monkeypatch
):
    """The listener began its quiet spell with nobody asleep (here: nobody waiting yet; in the
    run that found it, its first look had woken the waiter while it looked); the waiter then
    sleeps on a ticket locked elsewhere, and no notification follows the unlocking. The next
    look comes an interval later, not after the keep-alive's long silence."""
    monkeypatch.setattr(live, "KEEPALIVE", 120.0)
    (ticket,) = await run_sync(create_tickets, admin, 1)
    with override_settings(SUPPORT_WAIT_POLL_SECONDS=0.3):
        pool = live.pool()
        pool.start()
        await until(lambda: pool.listening)
        await asyncio.sleep(0.2)  # its first look done: in a quiet spell, nobody waiting
        with psycopg.connect(psycopg_conninfo("test-locker")) as locker:
            _lock_open_tickets(locker)
            fetch = asyncio.create_task(timed_get(agent_client, "/api/agent/tickets/?wait=10"))
            await waiting(1)
            await asyncio.sleep(0.5)
            assert not fetch.done()
        r, took = await fetch
    assert [t["id"] for t in r.json()] == [ticket.pk]
    assert took < 5
