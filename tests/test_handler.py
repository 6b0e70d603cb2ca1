"""The request path's threads (project/handler.py): each API request makes one blocking call, on
a thread reused from a bounded pool; its database connection is back in the pool after that
call; requests queue for a thread first come, first served, and get a JSON 503 when none comes
free in time; Django's request signals still reach anyone else who listens."""

import asyncio
import threading
import time

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.core import signals
from django.db import connections

from project import handler
from project.asgi import django_application
from project.handler import RequestThread, RequestThreads, ThreadsBusy
from support.models import Ticket
from tests.conftest import create_tickets, create_user, db_state

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _served_state():
    """Django's receivers off the request signals, as the served app has them (Django's test
    client, used by other tests, connects close_old_connections again)."""
    handler.disconnect_django_receivers()


@pytest.fixture
def threads(monkeypatch):
    """``threads(size, wait_timeout)``: the served app's pool replaced by a fresh one."""

    def make(size: int = 4, wait_timeout: float = 5.0) -> RequestThreads:
        pool = RequestThreads(size=size, wait_timeout=wait_timeout)
        monkeypatch.setattr(django_application, "threads", pool)
        return pool

    return make


@pytest.fixture
def hops(monkeypatch):
    """The blocking calls made by requests, as (thread name, connection open after it)."""
    seen: list[tuple[str, bool]] = []
    run_hop = handler._run_hop

    def recording(call):
        try:
            return run_hop(call)
        finally:
            seen.append(
                (
                    threading.current_thread().name,
                    any(c.connection is not None for c in connections.all(initialized_only=True)),
                )
            )

    monkeypatch.setattr(handler, "_run_hop", recording)
    return seen


def request_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("request")]


async def test_each_api_request_is_one_call_on_a_reused_thread(make_client, threads, hops):
    threads(size=4)
    admin = await sync_to_async(create_user)(staff=True)
    agent = await sync_to_async(create_user)(agent=True)
    ticket = (await sync_to_async(create_tickets)(admin, 20))[0]
    as_admin, as_agent, anonymous = (
        make_client(admin.token),
        make_client(agent.token),
        make_client(),
    )

    requests = [
        (as_agent.get("/api/agent/tickets/"), 200),  # the first fetch: a top-up
        (as_agent.get("/api/agent/tickets/"), 200),  # a poll at the cap
        (as_admin.get("/api/tickets/?page_size=5"), 200),
        (as_admin.post("/api/tickets/", json={"title": "Screen flickers"}), 201),
        (as_admin.patch(f"/api/tickets/{ticket.pk}/", json={"priority": "loud"}), 400),
        (as_admin.get("/api/tickets/999999/"), 404),
        (as_admin.get("/api/agents/"), 200),
        (anonymous.get("/api/tickets/"), 401),
        (as_agent.get("/api/tickets/"), 403),
    ]
    for pending, status in requests:
        before = len(hops)
        response = await pending
        assert response.status_code == status, response.text
        assert len(hops) == before + 1, f"{response.request.url}: {len(hops) - before} calls"
    held = (await as_agent.get("/api/agent/tickets/")).json()
    before = len(hops)
    move = {"ticket_id": held[0]["id"], "status": "resolved"}
    assert (await as_agent.post("/api/agent/tickets/", json=move)).status_code == 200
    assert len(hops) == before + 1
    before = len(hops)
    release = f"/api/agent/tickets/{held[1]['id']}/release/"
    assert (await as_agent.post(release)).status_code == 200
    assert len(hops) == before + 1

    names = {name for name, _ in hops}
    assert all(name.startswith("request") for name in names), names
    assert len(names) <= 4, names  # reused, never more than the pool's size
    # every call gave its database connection back before the thread went idle
    assert not any(kept for _, kept in hops), hops


async def test_threads_are_bounded_whatever_the_concurrency(make_client, threads):
    pool = threads(size=2)
    admin = await sync_to_async(create_user)(staff=True)
    agents = [await sync_to_async(create_user)(agent=True) for _ in range(8)]
    await sync_to_async(create_tickets)(admin, 200)
    clients = [make_client(a.token) for a in agents]
    peak = 0

    async def watch(stop: asyncio.Event):
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, len([t for t in request_threads() if t.is_alive()]))
            await asyncio.sleep(0.001)

    stop = asyncio.Event()
    watcher = asyncio.create_task(watch(stop))
    answers = await asyncio.gather(*(c.get("/api/agent/tickets/") for c in clients * 6))
    stop.set()
    await watcher
    assert [a.status_code for a in answers] == [200] * 48
    assert pool.started == 2
    held = [t for a in answers[:8] for t in a.json()]
    assert len(held) == 8 * 15
    assert len({t["id"] for t in held}) == 8 * 15


async def test_no_thread_free_in_time_is_a_json_503_that_changes_nothing(make_client, threads):
    pool = threads(size=1, wait_timeout=0.3)
    admin = await sync_to_async(create_user)(staff=True)
    client = make_client(admin.token)
    before = await sync_to_async(db_state)()

    # another request holds the only thread
    holder, go = RequestThread(pool), threading.Event()
    blocked = asyncio.get_running_loop().run_in_executor(holder, go.wait)
    started = time.monotonic()
    response = await client.post("/api/tickets/", json={"title": "Lost in the queue"})
    waited = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"] == "1"
    assert "detail" in response.json()
    assert 0.3 <= waited < 2, waited
    go.set()
    await blocked
    holder.release()
    assert await sync_to_async(db_state)() == before

    # a call outside the view (here a signal listener's) that finds no thread: the same 503
    def listener(**kwargs):
        pass

    go.clear()
    blocked = asyncio.get_running_loop().run_in_executor(holder, go.wait)
    signals.request_started.connect(listener)
    try:
        response = await client.post("/api/tickets/", json={"title": "Lost in the queue"})
    finally:
        signals.request_started.disconnect(listener)
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"] == "1"
    assert "detail" in response.json()
    go.set()
    await blocked
    holder.release()
    assert await sync_to_async(db_state)() == before

    # the thread is back: served
    response = await client.post("/api/tickets/", json={"title": "Served"})
    assert response.status_code == 201, response.text
    assert await Ticket.objects.filter(title="Served").aexists()


async def test_a_page_of_the_admin_site_with_no_thread_free_is_a_503_after_one_wait(
    make_client, threads
):
    pool = threads(size=1, wait_timeout=0.3)
    holder, go = RequestThread(pool), threading.Event()
    blocked = asyncio.get_running_loop().run_in_executor(holder, go.wait)
    started = time.monotonic()
    response = await make_client().get("/admin/login/")
    waited = time.monotonic() - started
    go.set()
    await blocked
    holder.release()
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert "detail" in response.json()
    assert 0.3 <= waited < 0.6, waited  # one wait, not one per call Django makes
    assert (await make_client().get("/admin/login/")).status_code == 200


async def test_requests_queue_for_a_thread_first_come_first_served():
    pool = RequestThreads(size=1, wait_timeout=5)
    loop = asyncio.get_running_loop()
    holder, go = RequestThread(pool), threading.Event()
    blocked = loop.run_in_executor(holder, go.wait)
    order: list[int] = []
    queued = [RequestThread(pool) for _ in range(5)]
    calls = [loop.run_in_executor(q, order.append, n) for n, q in enumerate(queued)]
    await asyncio.sleep(0.05)
    assert order == []
    assert pool.waiting == 5
    go.set()
    await blocked
    holder.release()
    for n, (q, call) in enumerate(zip(queued, calls, strict=True)):
        await call
        q.release()
        assert order == list(range(n + 1))
    assert pool.started == 1
    assert pool.waiting == 0


async def test_a_request_that_gives_up_while_queued_leaves_its_place():
    pool = RequestThreads(size=1, wait_timeout=5)
    loop = asyncio.get_running_loop()
    holder, go = RequestThread(pool), threading.Event()
    blocked = loop.run_in_executor(holder, go.wait)
    leaving, next_one = RequestThread(pool), RequestThread(pool)
    ran: list[str] = []
    gone = loop.run_in_executor(leaving, ran.append, "leaving")
    served = loop.run_in_executor(next_one, ran.append, "next")
    gone.cancel()
    leaving.release()  # its request ended (a client that went away)
    go.set()
    await blocked
    holder.release()
    await served
    assert ran == ["next"]


async def test_a_thread_given_back_while_its_call_runs_returns_when_the_call_ends():
    """A request whose client went away stops waiting for its call while the call goes on
    (asgiref lets it): its thread is not handed to another request before that call ends."""
    pool = RequestThreads(size=1, wait_timeout=0.2)
    loop = asyncio.get_running_loop()
    gone, go = RequestThread(pool), threading.Event()
    running = loop.run_in_executor(gone, go.wait)
    await asyncio.sleep(0.01)
    gone.release()  # its request ended; its call still runs
    with pytest.raises(ThreadsBusy):  # waited for a thread, in time, rather than behind the call
        await asyncio.wait_for(loop.run_in_executor(RequestThread(pool), time.sleep, 0), 1)
    queued = RequestThread(pool)
    served = loop.run_in_executor(queued, lambda: threading.current_thread().name)
    await asyncio.sleep(0.05)
    assert not served.done()
    go.set()
    await running
    assert (await asyncio.wait_for(served, 1)).startswith("request")
    queued.release()
    assert pool.started == 1


async def test_the_wait_for_a_thread_expires_as_threads_busy():
    pool = RequestThreads(size=1, wait_timeout=0.1)
    loop = asyncio.get_running_loop()
    holder, go = RequestThread(pool), threading.Event()
    blocked = loop.run_in_executor(holder, go.wait)
    with pytest.raises(ThreadsBusy):
        await loop.run_in_executor(RequestThread(pool), time.sleep, 0)
    go.set()
    await blocked


async def test_request_signals_reach_their_other_listeners(make_client, threads):
    threads(size=2)
    admin = await sync_to_async(create_user)(staff=True)
    heard: list[tuple[str, bool]] = []
    loop_thread = threading.current_thread()

    def started(**kwargs):
        heard.append(("started", threading.current_thread() is loop_thread))

    def finished(**kwargs):
        heard.append(("finished", threading.current_thread() is loop_thread))

    signals.request_started.connect(started)
    signals.request_finished.connect(finished)
    try:
        response = await make_client(admin.token).get("/api/agents/")
    finally:
        signals.request_started.disconnect(started)
        signals.request_finished.disconnect(finished)
    assert response.status_code == 200
    # sync listeners, so each runs off the event loop, as with Django's own handler
    assert heard == [("started", False), ("finished", False)]


async def test_a_request_outside_the_handler_keeps_asgiref_semantics():
    """The pool's executor is one thread: calls of one request run in order on it."""
    pool = RequestThreads(size=3, wait_timeout=5)
    thread = RequestThread(pool)
    async with ThreadSensitiveContext(executor=thread):
        names = {await sync_to_async(lambda: threading.current_thread().name)() for _ in range(5)}
    thread.release()
    assert len(names) == 1
