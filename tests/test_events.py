"""The live event feed, GET /api/events/: who sees what, JSON pages, Server-Sent Events, resumes
without loss or repeat (a reconnect, a killed worker, a dropped feed connection), transactions
in flight that must hold later events back, heartbeats, re-checked tokens, and what a waiting
stream holds (no request thread, no database connection).

Streams run on the real ASGI application in-process (httpx's ASGITransport waits for the whole
body, so :class:`Stream` drives the app itself), or over HTTP on a real uvicorn for the killed
worker.
"""

import asyncio
import contextlib
import json
import os
import signal
import time

import httpx
import psycopg
import pytest
from django.db import connection

from project.asgi import django_application
from project.handler import RequestThreads
from support import services
from support.api import events as events_view
from support.api import feed as feed_module
from support.models import Ticket, TicketEvent
from support.services import events as events_services
from support.services.events import Horizon, Snapshot, Viewer, visible_events
from tests.conftest import create_held, create_tickets, create_user, run_sync
from tests.servers import psycopg_conninfo, run_uvicorn, tcp_port_owner

pytestmark = pytest.mark.django_db(transaction=True)

EVENT_KEYS = {"id", "ticket", "at", "actor", "kind", "from_status", "to_status", "agent", "changes"}
WAIT = 10.0  # seconds any one expected thing may take before the test fails


@pytest.fixture(autouse=True)
def _feed_settings(settings):
    """Short polls and heartbeats (the feed's connection goes to the test database, as the
    app's own connections do)."""
    settings.SUPPORT_EVENTS_POLL_SECONDS = 0.02
    settings.SUPPORT_EVENTS_HEARTBEAT_SECONDS = 5.0


# --- An SSE client over the ASGI app ---------------------------------------------------------


def parse_sse(block: bytes) -> dict:
    """One SSE message (the lines between blank lines) as a dict: id (int), event, data (the
    JSON), retry, or comment."""
    message = {}
    for line in block.decode().split("\n"):
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "":
            message["comment"] = value
        elif field == "id":
            message["id"] = int(value)
        elif field == "data":
            message["data"] = json.loads(value)
        else:
            message[field] = value
    return message


class Stream:
    """``GET path`` with ``Accept: text/event-stream`` on the ASGI app, read as it comes.

    ``async with Stream(app, path, token=...) as s``: ``s.status``, ``s.headers``, then
    ``await s.events(n)`` / ``await s.until(pred)``; leaving the block disconnects the client
    (as uvicorn reports it) and waits for the app to finish.
    """

    def __init__(self, app, path: str, *, token: str | None = None, headers: dict | None = None):
        self.app = app
        path, _, query = path.partition("?")
        sent = {"host": "testserver", "accept": "text/event-stream", **(headers or {})}
        if token:
            sent["authorization"] = f"Token {token}"
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(k.encode(), v.encode()) for k, v in sent.items()],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        self._gone = asyncio.Event()
        self._chunks: asyncio.Queue = asyncio.Queue()
        self._started = asyncio.get_running_loop().create_future()
        self._buffer = b""
        self.messages: list[dict] = []
        self.ended = False

    async def _receive(self):
        if not hasattr(self, "_asked"):
            self._asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message):
        if message["type"] == "http.response.start":
            self._started.set_result(message)
        elif message["type"] == "http.response.body":
            await self._chunks.put(message.get("body", b""))
            if not message.get("more_body", False):
                await self._chunks.put(None)

    async def __aenter__(self):
        self.task = asyncio.create_task(self.app(self.scope, self._receive, self._send))
        start = await asyncio.wait_for(self._started, WAIT)
        self.status = start["status"]
        self.headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
        return self

    async def __aexit__(self, *exc):
        await self.disconnect()

    async def disconnect(self):
        self._gone.set()
        await asyncio.wait_for(self.task, WAIT)

    async def _more(self, seconds: float) -> bool:
        """Read one more chunk into messages; False at the end of the body."""
        chunk = await asyncio.wait_for(self._chunks.get(), seconds)
        if chunk is None:
            self.ended = True
            return False
        self._buffer += chunk
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            self.messages.append(parse_sse(block))
        return True

    async def body(self) -> bytes:
        """The whole body (an error answer, or a stream that ended)."""
        while not self.ended:
            await self._more(WAIT)
        return self._buffer

    async def until(self, done, seconds: float = WAIT) -> list[dict]:
        """Read until ``done(messages)``; the messages."""
        deadline = time.monotonic() + seconds
        while not done(self.messages):
            left = deadline - time.monotonic()
            if left <= 0 or self.ended:
                raise AssertionError(f"stream: condition not met; got {self.messages}")
            with contextlib.suppress(TimeoutError):
                await self._more(left)
        return self.messages

    def events(self) -> list[dict]:
        return [m for m in self.messages if "data" in m]

    async def event_ids(self, count: int, seconds: float = WAIT) -> list[int]:
        await self.until(lambda _: len(self.events()) >= count, seconds)
        return [m["id"] for m in self.events()]


def ids_after(after: int) -> list[int]:
    """The history's ids after ``after``, from the table itself."""
    return list(
        TicketEvent.objects.filter(id__gt=after).order_by("id").values_list("id", flat=True)
    )


def last_id() -> int:
    return TicketEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0


async def settle_feed():
    """Until the running loop's feed has caught up with the table (every event final)."""
    target = await run_sync(last_id)
    deadline = time.monotonic() + WAIT
    while True:
        feed = feed_module.current_feed()
        if feed is not None and feed.final is not None and feed.final >= target:
            return
        assert time.monotonic() < deadline, "the feed did not catch up"
        await asyncio.sleep(0.01)


# --- Pure: the horizon rule --------------------------------------------------------------------


@pytest.mark.smoke
@pytest.mark.django_db(transaction=False)
def test_horizon_unbroken_run_is_final_at_once():
    horizon = Horizon(10)
    # 11, 12 visible, 13 missing (in flight), 14 visible; transactions in flight
    assert horizon.advance(Snapshot(xmin=100, fence=105, ids=(11, 12, 14), top=14)) == 12
    assert horizon.waiting()


@pytest.mark.smoke
@pytest.mark.django_db(transaction=False)
def test_horizon_waits_for_the_transactions_in_flight_at_the_snapshot():
    horizon = Horizon(10)
    assert horizon.advance(Snapshot(100, 105, (11, 12, 14), 14)) == 12
    # a later snapshot: 104 still runs (xmin 104 < 105): 13 may still come
    assert horizon.advance(Snapshot(104, 107, (14, 15), 15)) == 12
    # every transaction below 105 has ended: 13 never came (rolled back): up to 14 is final,
    # and 15 right after it; 17 waits for the transactions below 108 (16 is not there yet)
    assert horizon.advance(Snapshot(105, 108, (14, 15, 17), 17)) == 15
    assert horizon.advance(Snapshot(107, 109, (17,), 17)) == 15
    assert horizon.advance(Snapshot(108, 110, (17,), 17)) == 17  # below 108: all ended
    assert not horizon.waiting()


@pytest.mark.smoke
@pytest.mark.django_db(transaction=False)
def test_horizon_takes_what_committed_in_the_gap_and_never_goes_back():
    horizon = Horizon(10)
    assert horizon.advance(Snapshot(100, 105, (12,), 12)) == 10
    assert horizon.advance(Snapshot(100, 106, (11, 12), 12)) == 12  # 11 committed: unbroken
    assert horizon.advance(Snapshot(1, 1, (), 5)) == 12  # an older top changes nothing


@pytest.mark.smoke
@pytest.mark.django_db(transaction=False)
def test_horizon_does_not_pass_the_rows_in_hand():
    horizon = Horizon(0)
    assert horizon.advance(Snapshot(100, 105, (2, 3), 3)) == 0
    # the fence (3, 105) is passed, but the limited read holds only up to 2 now
    assert horizon.advance(Snapshot(105, 106, (1, 2), 2), reach=2) == 2
    assert horizon.advance(Snapshot(106, 107, (3,), 3)) == 3


# --- Who sees what ------------------------------------------------------------------------------


def _story(admin, a, b) -> dict[str, int]:
    """Four tickets through every kind of event, two agents; the tickets by name."""
    new = {"description": "", "priority": 1, "created_by_id": admin.pk}
    made = [services.ticket_create(title=f"story {n}", **new) for n in range(4)]
    t1, t2, t3, t4 = (row["id"] for row in made)
    as_admin = {"actor_id": admin.pk}
    services.tickets_top_up(agent_id=a.pk)  # a takes all four
    services.ticket_transition_by_agent(agent_id=a.pk, ticket_id=t1, to_status="resolved")
    services.ticket_update(ticket_id=t1, changes={"title": "renamed"}, **as_admin)
    services.ticket_update(ticket_id=t1, changes={"assigned_to": b.pk}, **as_admin)
    services.ticket_transition_by_agent(agent_id=b.pk, ticket_id=t1, to_status="closed")
    services.ticket_update(ticket_id=t1, changes={"priority": 3}, **as_admin)
    services.ticket_update(ticket_id=t2, changes={"assigned_to": None}, **as_admin)
    services.ticket_update(ticket_id=t2, changes={"assigned_to": b.pk}, **as_admin)
    services.ticket_delete(ticket_id=t3, **as_admin)
    services.ticket_update(ticket_id=t4, changes={"status": "open"}, **as_admin)
    services.tickets_top_up(agent_id=b.pk)  # b takes t4 from the pool
    return {"t1": t1, "t2": t2, "t3": t3, "t4": t4}


def _expected(tickets: dict[str, int], who: str) -> list[tuple[int, str]]:
    """What ``who`` sees of the story, in order, as (ticket, kind); written out by hand."""
    t1, t2, t3, t4 = tickets["t1"], tickets["t2"], tickets["t3"], tickets["t4"]
    seen = {
        # a: the events that gave it each ticket, everything while it held them (resolved
        # keeps its agent), and the events that took them away; nothing after
        "a": [
            (t1, "assigned"),
            (t2, "assigned"),
            (t3, "assigned"),
            (t4, "assigned"),
            (t1, "status_changed"),
            (t1, "edited"),
            (t1, "reassigned"),
            (t2, "released"),
            (t3, "deleted"),
            (t4, "released"),
        ],
        "b": [
            (t1, "reassigned"),
            (t1, "status_changed"),
            (t1, "edited"),
            (t2, "assigned"),
            (t4, "assigned"),
        ],
    }
    return seen[who]


async def _page_all(client, after: int = 0, limit: int = 1000) -> list[dict]:
    found = []
    while True:
        response = await client.get("/api/events/", params={"after": after, "limit": limit})
        assert response.status_code == 200, response.text
        body = response.json()
        found += body["events"]
        if len(body["events"]) < limit:
            return found
        after = body["next_after"]


async def test_agents_see_the_events_of_tickets_they_hold_or_held_admins_see_all(
    make_client, asgi_app
):
    admin = await run_sync(create_user, staff=True)
    a = await run_sync(create_user, agent=True)
    b = await run_sync(create_user, agent=True)
    start = await run_sync(last_id)
    async with (
        Stream(asgi_app, "/api/events/", token=admin.token) as admin_live,
        Stream(asgi_app, "/api/events/", token=a.token) as a_live,
        Stream(asgi_app, "/api/events/", token=b.token) as b_live,
    ):
        await settle_feed()
        tickets = await run_sync(_story, admin, a, b)
        every = await run_sync(ids_after, start)
        paged = {}
        for who, user in (("a", a), ("b", b)):
            events = await _page_all(make_client(user.token), after=start)
            assert [(e["ticket"], e["kind"]) for e in events] == _expected(tickets, who), who
            paged[who] = [e["id"] for e in events]
        everything = await _page_all(make_client(admin.token), after=start)
        assert [e["id"] for e in everything] == every
        assert len(every) == 4 + 4 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1
        by_id = {e["id"]: e for e in everything}

        # live streams (the feed's buffer, filtered per stream) say the same
        a_ids, b_ids = paged["a"], paged["b"]
        assert await a_live.event_ids(len(a_ids)) == a_ids
        assert await b_live.event_ids(len(b_ids)) == b_ids
        assert await admin_live.event_ids(len(every)) == every
        # and as streams from the start of the story (from the database: older than the feed)
        async with Stream(asgi_app, f"/api/events/?after={start}", token=a.token) as a_again:
            assert await a_again.event_ids(len(a_ids)) == a_ids
        await asyncio.sleep(0.2)  # nothing more for anyone
        for stream, expected in ((a_live, a_ids), (b_live, b_ids), (admin_live, every)):
            assert [m["id"] for m in stream.events()] == expected

    # each SSE message: id, the kind as its event name, the page's JSON as its data
    for message in admin_live.events():
        assert message["event"] == message["data"]["kind"]
        assert message["data"] == by_id[message["id"]]
        assert set(message["data"]) == EVENT_KEYS
    reassigned = next(e for e in everything if e["kind"] == "reassigned")
    assert reassigned["agent"] == b.pk
    assert reassigned["changes"]["assigned_to"] == [a.pk, b.pk]


async def test_an_admin_who_is_also_an_agent_sees_every_event(make_client):
    both = await run_sync(create_user, staff=True, agent=True)
    other = await run_sync(create_user, agent=True)
    start = await run_sync(last_id)
    await run_sync(create_held, both, other, 2)
    await run_sync(services.tickets_top_up, agent_id=other.pk)
    ticket = await run_sync(lambda: Ticket.objects.filter(assigned_to=other).first().pk)
    move = {"agent_id": other.pk, "ticket_id": ticket, "to_status": "resolved"}
    await run_sync(services.ticket_transition_by_agent, **move)
    events = await _page_all(make_client(both.token), after=start)
    assert [e["id"] for e in events] == await run_sync(ids_after, start)
    assert events


def test_the_feed_rule_in_python_and_in_sql_agree(admin, agent, other_agent):
    _story(admin, agent, other_agent)
    rows = list(TicketEvent.objects.values("id", "agent_id", "previous_agent_id"))
    for user in (agent, other_agent, admin):
        viewer = Viewer(user.pk)
        by_sql = {r["id"] for r in visible_events(viewer, after=0, upto=10**9, limit=1000)}
        by_python = {r["id"] for r in rows if viewer.sees(r["agent_id"], r["previous_agent_id"])}
        assert by_sql == by_python
    assert len(visible_events(Viewer(None), after=0, upto=10**9, limit=1000)) == len(rows)


def _plan_nodes(plan: dict) -> list[dict]:
    return [plan, *(n for child in plan.get("Plans", []) for n in _plan_nodes(child))]


def test_an_agents_page_reads_its_two_index_ranges_however_long_the_history(
    admin, agent, other_agent
):
    """Each part stops after a page's rows and the parts merge in order: no sort, and no read
    of other agents' events or of the agent's events past the page."""
    ticket = create_tickets(admin, 1)[0].pk
    crowd = {"ticket_id": ticket, "actor": admin, "kind": "edited", "agent": other_agent}
    TicketEvent.objects.bulk_create(TicketEvent(**crowd) for _ in range(5000))
    mine = {"ticket_id": ticket, "actor": admin, "kind": "reassigned"}
    TicketEvent.objects.bulk_create(
        TicketEvent(**mine, agent=agent, previous_agent=other_agent) for _ in range(300)
    )
    TicketEvent.objects.bulk_create(
        TicketEvent(**mine, agent=other_agent, previous_agent=agent) for _ in range(300)
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE support_ticketevent")
    captured = []

    def record(execute, sql, params, many, context):
        captured.append((sql, params))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        rows = visible_events(Viewer(agent.pk), after=0, upto=10**9, limit=50)
    assert len(rows) == 50
    sql, params = captured[-1]
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", params)
        plan = cursor.fetchone()[0][0]["Plan"]
    nodes = _plan_nodes(plan)
    scans = {n["Index Name"]: n["Actual Rows"] for n in nodes if "Index Name" in n}
    assert set(scans) == {"event_agent_idx", "event_previous_agent_idx"}, plan
    assert all(rows <= 50 for rows in scans.values()), scans
    assert not any(n["Node Type"] in ("Sort", "Seq Scan", "Bitmap Heap Scan") for n in nodes)


# --- JSON pages ---------------------------------------------------------------------------------


@pytest.mark.smoke
async def test_pages_walk_the_history_in_id_order_and_start_now_without_a_cursor(
    admin_client, admin
):
    empty = await admin_client.get("/api/events/")
    assert empty.status_code == 200, empty.text
    assert empty.headers["Content-Type"] == "application/json"
    now = empty.json()
    assert now == {"events": [], "next_after": await run_sync(last_id)}

    tickets = []
    for n in range(5):
        created = await admin_client.post("/api/tickets/", json={"title": f"paged {n}"})
        assert created.status_code == 201
        tickets.append(created.json()["id"])
    moved = await admin_client.patch(f"/api/tickets/{created.json()['id']}/", json={"title": "x"})
    assert moved.status_code == 200
    expected = await run_sync(ids_after, now["next_after"])
    assert len(expected) == 6

    seen, after = [], now["next_after"]
    for size in (2, 2, 2):  # full pages: next_after is the last event's id
        page = (await admin_client.get("/api/events/", params={"after": after, "limit": 2})).json()
        assert len(page["events"]) == size
        seen += page["events"]
        after = page["next_after"]
        assert after == page["events"][-1]["id"]
    last = (await admin_client.get("/api/events/", params={"after": after, "limit": 2})).json()
    assert last == {"events": [], "next_after": expected[-1]}  # the end, for now
    assert [e["id"] for e in seen] == expected
    assert [e["kind"] for e in seen] == ["created"] * 5 + ["edited"]
    assert [e["ticket"] for e in seen] == [*tickets, tickets[-1]]
    assert all(set(e) == EVENT_KEYS for e in seen)
    assert seen[-1]["changes"] == {"title": [f"paged {4}", "x"]}
    # from the start of the history, default limit
    whole = (await admin_client.get("/api/events/", params={"after": 0})).json()
    assert [e["id"] for e in whole["events"]] == await run_sync(ids_after, 0)


@pytest.mark.smoke
@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("after=-1", "after"),
        ("after=abc", "after"),
        ("after=1.5", "after"),
        ("after=", "after"),
        ("after=%2B5", "after"),
        ("after=1234567890123456789", "after"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("limit=", "limit"),
    ],
)
async def test_bad_parameters_answer_400_with_the_field_for_pages_and_streams(
    admin_client, admin, asgi_app, query, field
):
    before = await run_sync(last_id)
    response = await admin_client.get(f"/api/events/?{query}")
    assert response.status_code == 400
    assert list(response.json()) == [field]
    async with Stream(asgi_app, f"/api/events/?{query}", token=admin.token) as stream:
        assert stream.status == 400
        assert stream.headers["content-type"] == "application/json"
        assert list(json.loads(await stream.body())) == [field]
    assert await run_sync(last_id) == before


@pytest.mark.smoke
async def test_a_bad_last_event_id_answers_400(admin, asgi_app):
    headers = {"last-event-id": "12abc"}
    async with Stream(asgi_app, "/api/events/", token=admin.token, headers=headers) as stream:
        assert stream.status == 400
        assert json.loads(await stream.body()) == {
            "Last-Event-ID": ["An event id: digits only, at most 18."]
        }


@pytest.mark.smoke
async def test_no_credentials_401_no_role_403_for_pages_and_streams(make_client, asgi_app):
    nobody = await run_sync(create_user)
    for token, code in ((None, 401), ("0" * 40, 401), (nobody.token, 403)):
        page = await make_client(token).get("/api/events/")
        assert page.status_code == code, page.text
        async with Stream(asgi_app, "/api/events/", token=token) as stream:
            assert stream.status == code
            assert "detail" in json.loads(await stream.body())
            if code == 401:
                assert stream.headers["www-authenticate"] == "Token"
    assert feed_module.current_feed() is None  # a refused stream never subscribed


# --- Streams ------------------------------------------------------------------------------------


@pytest.mark.smoke
async def test_a_stream_sends_each_new_event_as_it_happens(admin_client, admin, asgi_app):
    async with Stream(asgi_app, "/api/events/", token=admin.token) as stream:
        assert stream.status == 200
        assert stream.headers["content-type"] == "text/event-stream"
        assert stream.headers["cache-control"] == "no-cache"
        assert stream.headers["x-accel-buffering"] == "no"
        await stream.until(lambda m: m and m[0] == {"retry": "1000"})
        await settle_feed()
        created = await admin_client.post("/api/tickets/", json={"title": "live one"})
        ticket = created.json()["id"]
        [event_id] = await stream.event_ids(1)
        event = stream.events()[0]
        assert event["event"] == "created"
        assert event["data"]["ticket"] == ticket
        assert event["data"]["changes"]["title"] == [None, "live one"]
        assert await run_sync(ids_after, event_id - 1) == [event_id]  # the newest, nothing else
        await admin_client.delete(f"/api/tickets/{ticket}/")
        await stream.event_ids(2)
        assert [m["event"] for m in stream.events()] == ["created", "deleted"]


async def test_a_stream_resumes_after_last_event_id_or_after_losing_and_repeating_nothing(
    admin_client, admin, asgi_app
):
    start = await run_sync(last_id)
    for n in range(3):
        await admin_client.post("/api/tickets/", json={"title": f"before {n}"})
    async with Stream(asgi_app, f"/api/events/?after={start}", token=admin.token) as first:
        got = await first.event_ids(3)
    # while nobody listens
    for n in range(3):
        await admin_client.post("/api/tickets/", json={"title": f"meanwhile {n}"})
    # Last-Event-ID (what EventSource sends when it reconnects) wins over ?after=
    headers = {"last-event-id": str(got[1])}
    async with Stream(
        asgi_app, f"/api/events/?after={start}", token=admin.token, headers=headers
    ) as second:
        rest = await second.event_ids(4)
        await admin_client.post("/api/tickets/", json={"title": "after"})
        rest = await second.event_ids(5)
        await asyncio.sleep(0.2)
        assert [m["id"] for m in second.events()] == rest
    assert got[:2] + rest == await run_sync(ids_after, start)
    assert len(got[:2] + rest) == 7


async def test_a_stream_older_than_the_buffer_catches_up_from_the_database_then_goes_on_live(
    admin_client, admin, asgi_app, settings, monkeypatch
):
    settings.SUPPORT_EVENTS_BUFFER = 3
    monkeypatch.setattr(events_view, "CATCH_UP", 4)
    start = await run_sync(last_id)
    for n in range(10):
        await admin_client.post("/api/tickets/", json={"title": f"old {n}"})
    async with Stream(asgi_app, f"/api/events/?after={start}", token=admin.token) as stream:
        assert await stream.event_ids(10) == await run_sync(ids_after, start)
        # bursts larger than the buffer while the stream reads: it falls behind, reads the
        # database, comes back to the buffer
        for _ in range(3):
            await asyncio.gather(
                *(admin_client.post("/api/tickets/", json={"title": "burst"}) for _ in range(6))
            )
        await stream.event_ids(28)
        await asyncio.sleep(0.2)
        assert [m["id"] for m in stream.events()] == await run_sync(ids_after, start)


async def test_a_heartbeat_comment_comes_every_interval(admin, asgi_app, settings):
    settings.SUPPORT_EVENTS_HEARTBEAT_SECONDS = 0.2
    async with Stream(asgi_app, "/api/events/", token=admin.token) as stream:
        started = time.monotonic()
        await stream.until(lambda m: sum(x.get("comment") == "ping" for x in m) >= 3, seconds=3)
        assert 0.5 <= time.monotonic() - started < 2.0
        # each ping, and the start, carry the position: a client that saw no event resumes
        # from there (EventSource keeps the last id it read), not from "now" again
        position = await run_sync(last_id)
        pings = [m for m in stream.messages if m.get("comment") == "ping"]
        assert {m.get("id") for m in pings} == {position}
        assert {"id": position} in stream.messages


async def test_a_revoked_token_ends_the_stream_at_the_next_heartbeat(
    make_client, asgi_app, settings
):
    settings.SUPPORT_EVENTS_HEARTBEAT_SECONDS = 0.2
    agent = await run_sync(create_user, agent=True)
    async with Stream(asgi_app, "/api/events/", token=agent.token) as stream:
        await stream.until(lambda m: any(x.get("comment") == "ping" for x in m))
        assert (await make_client(agent.token).post("/api/auth/logout/")).status_code == 204
        await stream.body()  # the stream ends by itself
        assert stream.messages[-1] == {"comment": "the caller may no longer read this stream"}
        reconnect = await make_client(agent.token).get("/api/events/")
        assert reconnect.status_code == 401


async def test_an_agent_that_loses_its_role_is_cut_off_at_the_next_heartbeat(
    admin_client, asgi_app, settings
):
    settings.SUPPORT_EVENTS_HEARTBEAT_SECONDS = 0.2
    agent = await run_sync(create_user, agent=True)
    async with Stream(asgi_app, "/api/events/", token=agent.token) as stream:
        await stream.until(lambda m: any(x.get("comment") == "ping" for x in m))
        await run_sync(agent.groups.clear)
        await stream.body()
        assert stream.ended


# --- Transactions in flight ---------------------------------------------------------------------


def _hold_an_event(conn, ticket_id: int, actor_id: int) -> int:
    """In ``conn``'s open transaction, what every writer of events does (the ticket written
    first, then its event); the event's id. Nothing is committed."""
    conn.execute("UPDATE support_ticket SET updated_at = now() WHERE id = %s", [ticket_id])
    return conn.execute(
        "INSERT INTO support_ticketevent (ticket_id, at, actor_id, kind, from_status, to_status,"
        " changes) VALUES (%s, now(), %s, 'edited', 'open', 'open', '{}') RETURNING id",
        [ticket_id, actor_id],
    ).fetchone()[0]


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_an_event_in_flight_holds_back_later_ones_until_its_transaction_ends(
    admin_client, admin, asgi_app, outcome
):
    held_ticket, later_ticket = (t.pk for t in await run_sync(create_tickets, admin, 2))
    start = await run_sync(last_id)
    async with Stream(asgi_app, f"/api/events/?after={start}", token=admin.token) as stream:
        await settle_feed()
        # a second, real connection: its transaction has written an event and stays open
        with psycopg.connect(psycopg_conninfo("events-test-writer")) as held:
            lower = _hold_an_event(held, held_ticket, admin.pk)
            # meanwhile a later event commits, through the API
            moved = await admin_client.patch(f"/api/tickets/{later_ticket}/", json={"title": "b"})
            assert moved.status_code == 200
            later = await run_sync(last_id)
            assert later > lower
            assert await run_sync(ids_after, start) == [later]  # what a naive reader sees

            # a page waits for the transaction (a bounded second), then serves what is final:
            # nothing past the event in flight
            asked = time.monotonic()
            page = await admin_client.get("/api/events/", params={"after": start})
            assert 0.9 <= time.monotonic() - asked < 5
            assert page.json() == {"events": [], "next_after": start}
            # the stream holds the later event back too
            await asyncio.sleep(0.3)
            assert stream.events() == []

            if outcome == "commit":
                held.commit()
            else:
                held.rollback()
        expected = [lower, later] if outcome == "commit" else [later]
        assert await stream.event_ids(len(expected)) == expected
        page = await admin_client.get("/api/events/", params={"after": start})
        assert [e["id"] for e in page.json()["events"]] == expected
        await asyncio.sleep(0.2)
        assert [m["id"] for m in stream.events()] == expected


def test_a_younger_transaction_drawing_the_lower_id_holds_the_older_ones_event_back(admin):
    """A snapshot's xmax is one past the latest *completed* xid: a transaction that got its
    xid after that and still runs is in no snapshot's in-flight list. Here the older
    transaction commits the higher id while the younger, still open, holds the lower one and
    no other xid completes: a page must not pass the lower id until it is decided."""
    older_ticket, younger_ticket = (t.pk for t in create_tickets(admin, 2))
    start = last_id()
    with (
        psycopg.connect(psycopg_conninfo("events-test-older")) as older,
        psycopg.connect(psycopg_conninfo("events-test-younger")) as younger,
    ):
        older.execute("SELECT pg_current_xact_id()")  # the older xid
        younger.execute("SELECT pg_current_xact_id()")  # the younger one
        lower = _hold_an_event(younger, younger_ticket, admin.pk)
        higher = _hold_an_event(older, older_ticket, admin.pk)
        assert higher > lower
        older.commit()
        assert ids_after(start) == [higher]  # what a naive reader sees
        snapshot = events_services.read_top(start)
        assert snapshot.xmin < snapshot.fence  # the younger xid is below the fence
        assert events_services.final_horizon(start, wait=0.2) == start
        younger.commit()
    assert events_services.final_horizon(start) == higher
    assert ids_after(start) == [lower, higher]


async def test_a_page_without_a_cursor_answers_503_while_the_position_stays_unknown(
    admin_client, admin
):
    [ticket] = await run_sync(create_tickets, admin, 1)
    with psycopg.connect(psycopg_conninfo("events-test-writer")) as held:
        _hold_an_event(held, ticket.pk, admin.pk)
        await admin_client.post("/api/tickets/", json={"title": "committed after it"})
        response = await admin_client.get("/api/events/")
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert "detail" in response.json()
        held.rollback()
    response = await admin_client.get("/api/events/")
    assert response.json() == {"events": [], "next_after": await run_sync(last_id)}


def test_every_writer_of_events_has_its_transaction_id_before_the_events_draw_theirs(
    monkeypatch, admin, agent, other_agent
):
    """The horizon's premise (support.services.events): each service has written or locked
    a row before it inserts its events, so PostgreSQL has given its transaction an id."""
    kinds = set()
    insert = TicketEvent.objects.bulk_create

    def checked(events, *args, **kwargs):
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_current_xact_id_if_assigned()")
            assert cursor.fetchone()[0] is not None
        kinds.update(event.kind for event in events)
        return insert(events, *args, **kwargs)

    monkeypatch.setattr(TicketEvent.objects, "bulk_create", checked)
    _story(admin, agent, other_agent)
    services.tickets_top_up(agent_id=other_agent.pk)
    services.agent_deactivate(agent_id=other_agent.pk, actor_id=admin.pk)
    assert kinds == set(TicketEvent.Kind.values)


# --- What a stream holds, and what it leaves ----------------------------------------------------


def _feed_sessions(conn) -> list[int]:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
        " AND datname = current_database()",
        [feed_module.APPLICATION_NAME],
    ).fetchall()
    return [pid for (pid,) in rows]


async def _until(condition, what: str):
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_waiting_streams_hold_no_request_thread_and_no_database_connection(
    admin_client, admin, asgi_app, monkeypatch
):
    agents = [await run_sync(create_user, agent=True) for _ in range(3)]
    await admin_client.post("/api/tickets/", json={"title": "history"})
    # a pool of this test's own: an earlier test's thread released as its loop closed never
    # comes back to the shared one
    threads = RequestThreads(size=4, wait_timeout=5.0)
    monkeypatch.setattr(django_application, "threads", threads)

    def busy_threads() -> int:
        return threads.started - len(threads._idle)

    busy_before = busy_threads()

    def connections_out() -> int:
        stats = connection.pool.get_stats()
        return stats["pool_size"] - stats["pool_available"]

    out_before = connections_out()  # this thread's own (the fixtures'), if open
    with psycopg.connect(psycopg_conninfo("events-test-observer"), autocommit=True) as observer:
        async with contextlib.AsyncExitStack() as stack:
            streams = [
                await stack.enter_async_context(Stream(asgi_app, "/api/events/?after=0", token=t))
                for t in [admin.token, *(a.token for a in agents)]
            ]
            await settle_feed()
            # the admin's stream read the history from the database (a thread, a connection)
            await streams[0].event_ids(len(await run_sync(ids_after, 0)))
            await asyncio.sleep(0.2)  # every stream waits now
            assert threads.started >= 1
            assert busy_threads() == busy_before, "a waiting stream holds a request thread"
            assert connections_out() == out_before, "a waiting stream holds a connection"
            assert len(_feed_sessions(observer)) == 1  # one feed connection for all streams
            assert feed_module.current_feed().subscribers == 4
            # and they still get what happens
            await admin_client.post("/api/tickets/", json={"title": "news"})
            last = await run_sync(last_id)
            for stream in streams[:1]:
                await stream.until(lambda m: any(x.get("id") == last for x in m))
        # all disconnected: no subscriber left, the feed stopped and its connection closed
        assert feed_module.current_feed() is None
        await _until(lambda: not _feed_sessions(observer), "the feed's connection stayed open")
        # A thread comes back when its last call has ended, which may be just after its
        # request gave it back (the pool thread's bookkeeping after the call's result).
        await _until(lambda: busy_threads() == busy_before, "a request thread never came back")


async def test_a_disconnected_stream_leaves_no_subscriber_behind(admin, asgi_app):
    first = Stream(asgi_app, "/api/events/", token=admin.token)
    second = Stream(asgi_app, "/api/events/", token=admin.token)
    async with first, second:
        await settle_feed()
        feed = feed_module.current_feed()
        assert feed.subscribers == 2
        await first.disconnect()
        assert feed.subscribers == 1
        assert first.task.done()
    assert feed.subscribers == 0
    await _until(lambda: feed._task.done(), "the feed kept running")
    assert feed_module.current_feed() is None


async def test_the_feed_reconnects_when_its_connection_dies_and_loses_nothing(
    admin_client, admin, asgi_app
):
    start = await run_sync(last_id)
    with psycopg.connect(psycopg_conninfo("events-test-observer"), autocommit=True) as observer:
        async with Stream(asgi_app, f"/api/events/?after={start}", token=admin.token) as stream:
            await settle_feed()
            for n in range(2):
                await admin_client.post("/api/tickets/", json={"title": f"before {n}"})
            await stream.event_ids(2)
            [pid] = _feed_sessions(observer)
            observer.execute("SELECT pg_terminate_backend(%s)", [pid])
            for n in range(3):  # while the feed reconnects
                await admin_client.post("/api/tickets/", json={"title": f"during {n}"})
            assert await stream.event_ids(5) == await run_sync(ids_after, start)
            [again] = _feed_sessions(observer)
            assert again != pid
            await admin_client.post("/api/tickets/", json={"title": "after"})
            assert await stream.event_ids(6) == await run_sync(ids_after, start)


# --- A worker killed under a stream -------------------------------------------------------------


async def _read_stream(client, url, headers, received: list[int], stop: asyncio.Event) -> None:
    """Read SSE events into ``received`` (complete messages only) until the connection breaks
    or ``stop`` is set."""
    buffer = b""
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200
        async for chunk in response.aiter_raw():
            buffer += chunk
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                message = parse_sse(block)
                if "id" in message:
                    received.append(message["id"])
            if stop.is_set():
                return


async def test_a_stream_resumes_on_another_worker_when_its_worker_is_killed():
    admin = await run_sync(create_user, staff=True)
    agents = [await run_sync(create_user, agent=True) for _ in range(3)]
    start = await run_sync(last_id)
    env = {"SUPPORT_EVENTS_POLL_SECONDS": "0.05"}
    with (
        run_uvicorn(workers=2, env=env) as server,
        psycopg.connect(psycopg_conninfo("events-test-observer"), autocommit=True) as observer,
    ):
        base = server.base_url
        auth = {"Authorization": f"Token {admin.token}"}
        sse = {**auth, "Accept": "text/event-stream"}
        received: list[int] = []
        writes_done = asyncio.Event()

        async def write(agent):
            """Tickets created, fetched, resolved and edited, while the stream reads, by one
            agent and the admin; three of these at once, so that commits overtake each other.
            A write that the kill cuts off is just lost (or not): the table is the truth."""
            mine = {"Authorization": f"Token {agent.token}"}
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                for n in range(15):
                    with contextlib.suppress(httpx.HTTPError):
                        made = await client.post(
                            "/api/tickets/", json={"title": f"kill {n}"}, headers=auth
                        )
                        held = await client.get("/api/agent/tickets/", headers=mine)
                        for row in held.json()[:1]:
                            await client.post(
                                "/api/agent/tickets/",
                                json={"ticket_id": row["id"], "status": "resolved"},
                                headers=mine,
                            )
                        await client.patch(
                            f"/api/tickets/{made.json()['id']}/",
                            json={"priority": "high"},
                            headers=auth,
                        )
                    await asyncio.sleep(0.02)

        async def writers():
            await asyncio.gather(*(write(agent) for agent in agents))
            writes_done.set()

        writer = asyncio.create_task(writers())
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(10, read=30)) as client:
            reading = asyncio.create_task(
                _read_stream(client, f"/api/events/?after={start}", sse, received, stop)
            )
            await _until(lambda: len(received) >= 15, "the stream got no events")
            # the worker serving the stream is the one with a feed connection
            [(_, port)] = _feed_sessions_with_ports(observer)
            victim = tcp_port_owner(port, server.worker_pids())
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(httpx.HTTPError):
                await asyncio.wait_for(reading, WAIT)
            cut = len(received)
            assert not writes_done.is_set(), "the writes ended before the kill: a weak test"

            # reconnect, as EventSource does: Last-Event-ID, to whichever worker answers
            resume = {**sse, "Last-Event-ID": str(received[-1])}
            reading = asyncio.create_task(
                _read_stream(client, f"/api/events/?after={start}", resume, received, stop)
            )
            await writes_done.wait()
            final = await run_sync(last_id)
            await _until(lambda: received[-1] >= final, "the resumed stream did not catch up")
            await asyncio.sleep(0.3)  # and nothing more comes
            stop.set()
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await reading
        await writer
    expected = await run_sync(ids_after, start)
    assert received == expected, f"cut at {cut}: {len(received)} received, {len(expected)} events"
    assert cut < len(received)  # events came after the reconnect too
    assert len(received) == len(set(received))


def _feed_sessions_with_ports(conn) -> list[tuple[int, int | None]]:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return conn.execute(
        "SELECT pid, client_port FROM pg_stat_activity WHERE application_name = %s"
        " AND datname = current_database()",
        [feed_module.APPLICATION_NAME],
    ).fetchall()


def test_a_stopping_worker_ends_its_streams_at_once(admin):
    """SIGTERM (a restart): open streams end at once, so that their clients reconnect to a
    running worker, instead of holding uvicorn's graceful shutdown (20 s) and being cut off."""
    with run_uvicorn(workers=1) as server:
        headers = {"Authorization": f"Token {admin.token}", "Accept": "text/event-stream"}
        with (
            httpx.Client(base_url=server.base_url, timeout=30) as client,
            client.stream("GET", "/api/events/", headers=headers) as stream,
        ):
            assert stream.status_code == 200
            lines = stream.iter_lines()
            assert next(lines).startswith("retry:")
            stopped_at = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            for _ in lines:  # until the server ends the body
                pass
            ended_in = time.monotonic() - stopped_at
        assert ended_in < 5
        server.proc.wait(timeout=15)
