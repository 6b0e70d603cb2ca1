"""A silent agent does not keep its tickets; an agent can hand one back.

- presence: marked in memory by every agent request, written in one batched upsert per flush;
- the idle sweep (support.services.idle_release): only silent agents' assigned tickets, with
  their event and reason, under the lock contract; one sweep at a time (the advisory lock);
  run by each worker's background task and by ``manage.py release_idle_agents``; the NOTIFY
  that wakes waiting agents;
- ``POST /api/agent/tickets/{id}/release/``: the hand-back.

Real PostgreSQL, committed transactions, parallel connections where the locks matter; the
``smoke`` tests run on SQLite too.
"""

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from io import StringIO

import httpx
import psycopg
import pytest
from django.core.management import call_command
from django.db import IntegrityError, OperationalError, connection, connections
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from support import housekeeping, presence, services
from support.models import AgentPresence, Ticket, TicketAssignment, TicketEvent
from support.services import idle_release
from support.services.idle_release import SWEEP_LOCK
from tests.conftest import create_tickets, create_user, db_state, run_sync
from tests.invariants import assert_invariants, held_ticket_ids
from tests.servers import ROOT, database_url, psycopg_conninfo, run_uvicorn

pytestmark = pytest.mark.django_db(transaction=True)

HOUR = 3600
NOT_YOURS = {"detail": services.NOT_YOURS}


@pytest.fixture(autouse=True)
def _no_marks_carried_over():
    """Marks are per process: none from earlier tests, none left for later ones."""
    presence.reset()
    yield
    presence.reset()


@pytest.fixture
def threads():
    """A pool for work that must run in parallel, each call on its own connection."""
    pool = ThreadPoolExecutor(max_workers=8)

    def submit(fn, /, *args, **kwargs):
        def call():
            try:
                return fn(*args, **kwargs)
            finally:
                connections.close_all()

        return pool.submit(call)

    yield submit
    pool.shutdown(wait=True)


def outside(autocommit: bool = True) -> psycopg.Connection:
    """A plain connection of its own, as another process or host would have."""
    return psycopg.connect(psycopg_conninfo("idle-release-test"), autocommit=autocommit)


# --- Data, made through the services so that the history replays -----------------------------
def give(admin, agent, count: int, *, ago: float = 0, status: str = "assigned") -> list[int]:
    """``count`` new tickets given to ``agent`` by an admin ``ago`` seconds ago, then moved to
    ``status`` by it."""
    ids = []
    for n in range(count):
        row = services.ticket_create(
            title=f"for {agent.username} #{n}", description="", priority=1, created_by_id=admin.pk
        )
        services.ticket_update(
            ticket_id=row["id"], changes={"assigned_to": agent.pk}, actor_id=admin.pk
        )
        if status in ("resolved", "closed"):
            services.ticket_transition_by_agent(
                agent_id=agent.pk, ticket_id=row["id"], to_status="resolved"
            )
        if status == "closed":
            services.ticket_transition_by_agent(
                agent_id=agent.pk, ticket_id=row["id"], to_status="closed"
            )
        ids.append(row["id"])
    if ago:
        at = timezone.now() - timedelta(seconds=ago)
        Ticket.objects.filter(pk__in=ids).update(assigned_at=at)
        TicketAssignment.objects.filter(ticket_id__in=ids).update(assigned_at=at)
    return ids


def last_seen(agent, ago: float) -> None:
    AgentPresence.objects.update_or_create(
        agent_id=agent.pk, defaults={"last_seen": timezone.now() - timedelta(seconds=ago)}
    )


def statuses(ids) -> dict[int, tuple[str, int | None]]:
    return {
        pk: (status, holder)
        for pk, status, holder in Ticket.objects.filter(pk__in=ids).values_list(
            "pk", "status", "assigned_to_id"
        )
    }


def released_events(ids) -> list[tuple]:
    return list(
        TicketEvent.objects.filter(ticket_id__in=ids, kind="released")
        .order_by("ticket_id", "id")
        .values_list("ticket_id", "actor_id", "agent_id", "from_status", "to_status", "changes")
    )


# --- Presence ----------------------------------------------------------------------------------
@pytest.mark.smoke
async def test_requests_mark_presence_in_memory_and_one_flush_writes_one_row(
    make_client, admin, agent
):
    client = make_client(agent.token)
    before = time.time()
    with override_settings(SUPPORT_PRESENCE_FLUSH_SECONDS=HOUR):  # only our flush writes
        answers = [
            (await client.get("/api/agent/tickets/")).status_code,
            (await client.get("/api/tickets/")).status_code,  # refused, still a sign of life
            (await client.post("/api/agent/tickets/999999/release/")).status_code,
        ]
        for _ in range(17):
            answers.append((await client.get("/api/agent/tickets/")).status_code)
    after = time.time()
    assert answers[:3] == [200, 403, 404]
    assert set(answers[3:]) == {200}
    # twenty requests: no write yet, the mark in memory
    assert await run_sync(AgentPresence.objects.count) == 0
    assert set(presence.pending()) == {agent.pk}
    assert before <= presence.pending()[agent.pk] <= after

    assert await run_sync(presence.flush) == 1
    [(agent_id, seen)] = await run_sync(
        lambda: list(AgentPresence.objects.values_list("agent_id", "last_seen"))
    )
    assert agent_id == agent.pk
    assert before - 0.001 <= seen.timestamp() <= after + 0.001
    assert presence.pending() == {}

    # more requests: the row waits for the next flush, which moves it on
    await client.get("/api/agent/tickets/")
    assert (await run_sync(AgentPresence.objects.get, agent_id=agent.pk)).last_seen == seen
    assert await run_sync(presence.flush) == 1
    assert (await run_sync(AgentPresence.objects.get, agent_id=agent.pk)).last_seen > seen
    assert await run_sync(presence.flush) == 0  # nothing new: no statement at all


@pytest.mark.smoke
async def test_admins_bad_tokens_and_anonymous_callers_mark_nobody(make_client, admin, agent):
    await make_client(admin.token).get("/api/tickets/")
    await make_client("0123456789abcdef0123456789abcdef01234567").get("/api/agent/tickets/")
    await make_client().get("/api/agent/tickets/")
    await run_sync(services.User.objects.filter(pk=agent.pk).update, is_active=False)
    assert (await make_client(agent.token).get("/api/agent/tickets/")).status_code == 401
    assert presence.pending() == {}


def test_one_flush_is_one_statement_for_many_agents_and_never_moves_presence_back(admin):
    agents = [create_user(agent=True) for _ in range(5)]
    last_seen(agents[0], 10)
    stored = AgentPresence.objects.get(agent_id=agents[0].pk).last_seen
    for n, someone in enumerate(agents):
        presence.seen(someone.pk, at=time.time() - 60 + n)  # agents[0]'s mark: older than stored
    presence.seen(987_654, at=time.time())  # a user deleted since its request: left out
    with CaptureQueriesContext(connection) as queries:
        assert presence.flush() == 6
    assert len(queries) == 1
    rows = dict(AgentPresence.objects.values_list("agent_id", "last_seen"))
    assert set(rows) == {a.pk for a in agents}
    assert rows[agents[0].pk] == stored  # GREATEST: an older mark does not move it back
    assert rows[agents[4].pk] > rows[agents[1].pk]


def test_a_flush_that_finds_the_database_down_keeps_its_marks_for_the_next(agent, monkeypatch):
    presence.seen(agent.pk)
    marked = presence.pending()

    class Down:
        vendor = connection.vendor
        ops = connection.ops

        def cursor(self):
            raise OperationalError("connection refused")

    monkeypatch.setattr(presence, "connection", Down())
    with pytest.raises(OperationalError):
        presence.flush()
    assert presence.pending() == marked
    monkeypatch.undo()
    assert presence.flush() == 1
    assert AgentPresence.objects.filter(agent_id=agent.pk).exists()


def test_a_flush_that_meets_a_user_deleted_meanwhile_keeps_the_other_marks(agent):
    """The user is deleted by another connection while the flush's upsert runs: its
    reference check waits for that deletion and fails at the end. The other agents' marks
    are kept, and the next flush writes them (and skips the user now gone)."""
    doomed = create_user(agent=True)
    presence.seen(agent.pk)
    presence.seen(doomed.pk)
    with psycopg.connect(psycopg_conninfo("presence-deleter")) as deleter:
        for table, column in (
            ("support_apitoken", "user_id"),
            ("auth_user_groups", "user_id"),
            ("auth_user", "id"),
        ):
            deleter.execute(f"DELETE FROM {table} WHERE {column} = %s", [doomed.pk])  # noqa: S608
        timer = threading.Timer(0.5, deleter.commit)
        timer.start()
        try:
            with pytest.raises(IntegrityError):
                presence.flush()  # waits on the deletion's row lock, then fails
        finally:
            timer.join()
    assert set(presence.pending()) == {agent.pk, doomed.pk}
    assert presence.flush() == 2  # asked for two; the gone user is skipped by the upsert
    assert list(AgentPresence.objects.values_list("agent_id", flat=True)) == [agent.pk]


def test_seen_marks_an_agent_without_a_request(agent):
    """What a live event stream held open by an agent calls."""
    presence.seen(agent.pk)
    presence.flush()
    assert AgentPresence.objects.get(agent_id=agent.pk).last_seen >= timezone.now() - timedelta(
        seconds=5
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "30.0"),
        ({"SUPPORT_AGENT_IDLE_RELEASE_SECONDS": "60"}, "15.0"),
        ({"SUPPORT_AGENT_IDLE_RELEASE_SECONDS": "900"}, "30.0"),
        ({"SUPPORT_AGENT_IDLE_RELEASE_SECONDS": "60", "SUPPORT_PRESENCE_FLUSH_SECONDS": "31"}, ""),
    ],
)
def test_the_flush_interval_follows_the_idle_limit_and_stays_under_half_of_it(env, expected):
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("SUPPORT_AGENT_IDLE_RELEASE_SECONDS", "SUPPORT_PRESENCE_FLUSH_SECONDS")
    } | {"DJANGO_DEBUG": "1", "DJANGO_SETTINGS_MODULE": "project.settings", **env}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from project import settings as s; print(s.SUPPORT_PRESENCE_FLUSH_SECONDS)",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if expected:
        assert (done.returncode, done.stdout.strip()) == (0, expected), done.stderr
    else:
        assert done.returncode != 0
        assert "at most half of SUPPORT_AGENT_IDLE_RELEASE_SECONDS" in done.stderr


# --- The idle sweep ----------------------------------------------------------------------------
@pytest.mark.smoke
def test_the_sweep_releases_only_silent_agents_assigned_tickets_with_the_reason(admin):
    silent, present, never_seen, newly_given, given_again = (
        create_user(agent=True) for _ in range(5)
    )
    lost = give(admin, silent, 3, ago=2 * HOUR)
    kept_record = give(admin, silent, 1, ago=2 * HOUR, status="resolved") + give(
        admin, silent, 1, ago=2 * HOUR, status="closed"
    )
    last_seen(silent, 2 * HOUR)
    kept_present = give(admin, present, 2, ago=2 * HOUR)
    last_seen(present, 60)
    lost_never_seen = give(admin, never_seen, 2, ago=2 * HOUR)  # an admin's, never fetched
    kept_new = give(admin, newly_given, 2)  # no presence yet, given just now
    # silent long, but an admin has just given it one more: the limit starts again
    kept_again = give(admin, given_again, 1, ago=2 * HOUR) + give(admin, given_again, 1)
    last_seen(given_again, 2 * HOUR)
    everything = lost + kept_record + kept_present + lost_never_seen + kept_new + kept_again
    before = statuses(everything)

    sweep = services.idle_agents_release(idle_seconds=HOUR)

    assert sweep.ran
    assert sweep.released == {silent.pk: lost, never_seen.pk: lost_never_seen}
    after = statuses(everything)
    for pk in lost + lost_never_seen:
        assert after[pk] == ("open", None)
    for pk in kept_record + kept_present + kept_new + kept_again:
        assert after[pk] == before[pk]
    assert released_events(everything) == [
        (
            pk,
            holder,
            holder,
            "assigned",
            "open",
            {"assigned_to": [holder, None], "status": ["assigned", "open"], "reason": "agent_idle"},
        )
        for holder, ids in ((silent.pk, lost), (never_seen.pk, lost_never_seen))
        for pk in ids
    ]
    assert not TicketAssignment.objects.filter(ticket_id__in=lost, is_active=True).exists()
    assert_invariants()
    # nothing left to release: a second sweep changes nothing
    state = db_state()
    assert services.idle_agents_release(idle_seconds=HOUR).released == {}
    assert db_state() == state


@pytest.mark.smoke
async def test_an_agents_move_on_a_ticket_lost_to_idle_release_is_404_like_anyone_elses(
    make_client, admin, agent
):
    [ticket] = await run_sync(give, admin, agent, 1, ago=2 * HOUR)
    sweep = await run_sync(services.idle_agents_release, idle_seconds=HOUR)
    assert sweep.released == {agent.pk: [ticket]}
    client = make_client(agent.token)
    moved = await client.post(
        "/api/agent/tickets/", json={"ticket_id": ticket, "status": "resolved"}
    )
    assert (moved.status_code, moved.json()) == (404, NOT_YOURS)
    handed = await client.post(f"/api/agent/tickets/{ticket}/release/")
    assert (handed.status_code, handed.json()) == (404, NOT_YOURS)
    history = await client.get(f"/api/tickets/{ticket}/history/")
    assert history.status_code == 404
    # back on its next fetch, it takes work from the pool again (that one too: it is there)
    assert [t["id"] for t in (await client.get("/api/agent/tickets/")).json()] == [ticket]


def test_a_sweep_passes_over_an_agent_whose_row_is_locked_and_never_waits(admin):
    busy, silent = create_user(agent=True), create_user(agent=True)
    busy_ids = give(admin, busy, 2, ago=2 * HOUR)
    silent_ids = give(admin, silent, 2, ago=2 * HOUR)
    with outside(autocommit=False) as locker:
        locker.execute("SELECT id FROM auth_user WHERE id = %s FOR NO KEY UPDATE", [busy.pk])
        started = time.monotonic()
        sweep = services.idle_agents_release(idle_seconds=HOUR)
        took = time.monotonic() - started
        locker.rollback()
    assert took < 2.0  # well under the lock timeout (3 s): it did not wait
    assert sweep.released == {silent.pk: silent_ids}
    assert services.idle_agents_release(idle_seconds=HOUR).released == {busy.pk: busy_ids}


def test_an_agent_seen_between_the_sweeps_first_read_and_its_locks_keeps_its_tickets(
    admin, threads, monkeypatch
):
    """Silence is judged again under the locks: a presence flushed (by another worker) or a
    ticket given (by an admin) after the candidates were read counts."""
    seen_late, given_late, silent = (create_user(agent=True) for _ in range(3))
    kept_seen = give(admin, seen_late, 2, ago=2 * HOUR)
    kept_given = give(admin, given_late, 1, ago=2 * HOUR)
    lost = give(admin, silent, 1, ago=2 * HOUR)
    real = idle_release._silent_agents
    added = []

    def then_meanwhile(cutoff):
        candidates = real(cutoff)
        with outside() as other:  # committed before the sweep takes its locks
            other.execute(
                "INSERT INTO support_agent_presence (agent_id, last_seen) VALUES (%s, now())",
                [seen_late.pk],
            )
        added.extend(threads(give, admin, given_late, 1).result(timeout=10))  # committed too
        return candidates

    monkeypatch.setattr(idle_release, "_silent_agents", then_meanwhile)
    sweep = services.idle_agents_release(idle_seconds=HOUR)
    assert sweep.released == {silent.pk: lost}
    assert held_ticket_ids(seen_late.pk) == set(kept_seen)
    assert held_ticket_ids(given_late.pk) == set(kept_given + added)


def test_the_lock_contract_holds_between_a_sweep_and_concurrent_fetches(
    admin, threads, monkeypatch
):
    """The sweep holds the silent agent's row and tickets: that agent's own fetch waits for it
    (its row is the mutex of what it holds) and then finds its tickets gone; another agent's
    fetch does not wait and never gets a ticket still held."""
    silent, busy = create_user(agent=True), create_user(agent=True)
    silent_ids = give(admin, silent, 3, ago=2 * HOUR)
    create_tickets(admin, 20)
    locked, go = threading.Event(), threading.Event()
    real = idle_release.move_tickets

    def pausing(*args, **kwargs):  # the sweep, its locks taken, before its first write
        locked.set()
        assert go.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(idle_release, "move_tickets", pausing)
    sweep = threads(services.idle_agents_release, idle_seconds=HOUR)
    assert locked.wait(10)
    other = threads(services.tickets_top_up, agent_id=busy.pk, role_checked=True)
    own = threads(services.tickets_top_up, agent_id=silent.pk, role_checked=True)
    other_rows = other.result(timeout=5)  # did not wait for the sweep
    time.sleep(0.5)
    assert not own.done()  # waits for its row, which the sweep holds
    go.set()
    assert sweep.result(timeout=10).released == {silent.pk: silent_ids}
    own_rows = own.result(timeout=10)

    assert len(other_rows) == 15
    assert not {row["id"] for row in other_rows} & set(silent_ids)
    assert {row["id"] for row in own_rows} == held_ticket_ids(silent.pk)
    assert {row["id"] for row in other_rows} == held_ticket_ids(busy.pk)
    assert len(own_rows) == 8  # 23 tickets: 15 for the other agent, the rest back to it
    assert_invariants()


# --- One sweep at a time -----------------------------------------------------------------------
def test_a_sweep_does_nothing_while_another_connection_holds_the_sweep_lock(admin):
    silent = create_user(agent=True)
    ids = give(admin, silent, 2, ago=2 * HOUR)
    with outside(autocommit=False) as other:  # another host's sweep, mid-transaction
        other.execute("SELECT pg_advisory_xact_lock(%s)", [SWEEP_LOCK])
        started = time.monotonic()
        sweep = services.idle_agents_release(idle_seconds=HOUR)
        assert time.monotonic() - started < 2.0  # a try: no wait (the lock timeout is 3 s)
        assert (sweep.ran, sweep.released) == (False, {})
        assert statuses(ids) == {pk: ("assigned", silent.pk) for pk in ids}
        other.commit()  # transaction-level: gone with the transaction
    sweep = services.idle_agents_release(idle_seconds=HOUR)
    assert (sweep.ran, sweep.released) == (True, {silent.pk: ids})


def test_the_sweep_lock_lasts_exactly_its_transaction(admin):
    create_user(agent=True)
    with outside() as watcher:
        held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s"
        low = SWEEP_LOCK & 0xFFFFFFFF
        seen_inside = []
        real = idle_release._silent_agents

        def looking(cutoff):
            seen_inside.append(watcher.execute(held, [low]).fetchone()[0])
            return real(cutoff)

        idle_release._silent_agents = looking
        try:
            services.idle_agents_release(idle_seconds=HOUR)
        finally:
            idle_release._silent_agents = real
        assert seen_inside == [1]
        assert watcher.execute(held, [low]).fetchone()[0] == 0


def test_two_concurrent_sweeps_release_each_ticket_once(admin, threads, monkeypatch):
    agents = [create_user(agent=True) for _ in range(4)]
    expected = {a.pk: give(admin, a, 3, ago=2 * HOUR) for a in agents}
    inside, go = threading.Event(), threading.Event()
    real = idle_release._silent_agents
    calls = []

    def pausing(cutoff):  # the first sweep, its advisory lock taken
        calls.append(cutoff)
        if len(calls) == 1:
            inside.set()
            assert go.wait(10)
        return real(cutoff)

    monkeypatch.setattr(idle_release, "_silent_agents", pausing)
    first = threads(services.idle_agents_release, idle_seconds=HOUR)
    assert inside.wait(10)
    second = threads(services.idle_agents_release, idle_seconds=HOUR).result(timeout=5)
    assert (second.ran, second.released) == (False, {})  # answered while the first ran
    go.set()
    assert first.result(timeout=10).released == expected
    assert len(calls) == 1

    # and at a barrier, without pauses: the tickets of the silent, released once in all
    monkeypatch.setattr(idle_release, "_silent_agents", real)
    more = [create_user(agent=True) for _ in range(4)]
    expected = {a.pk: give(admin, a, 3, ago=2 * HOUR) for a in more}
    barrier = threading.Barrier(4)

    def sweep_at_barrier():
        barrier.wait(10)
        return services.idle_agents_release(idle_seconds=HOUR)

    sweeps = [f.result(timeout=20) for f in [threads(sweep_at_barrier) for _ in range(4)]]
    released = [pk for s in sweeps for ids in s.released.values() for pk in ids]
    assert sorted(released) == sorted(pk for ids in expected.values() for pk in ids)
    every = [pk for ids in expected.values() for pk in ids]
    assert len(released_events(every)) == len(every)
    assert_invariants()


def test_released_tickets_wake_the_agents_waiting_for_work(admin):
    """Entering the pool, the tickets send NOTIFY support_pool (migration 0011's trigger),
    delivered when the sweep commits."""
    silent = create_user(agent=True)
    ids = give(admin, silent, 3, ago=2 * HOUR)
    with outside() as listener:
        listener.execute("LISTEN support_pool")
        assert list(listener.notifies(timeout=0.2)) == []  # nothing pending before
        assert services.idle_agents_release(idle_seconds=HOUR).released == {silent.pk: ids}
        heard = list(listener.notifies(timeout=5, stop_after=1))
    assert [(n.channel, n.payload.split()[0]) for n in heard] == [("support_pool", "3")]


# --- Where sweeps run: each worker's background task, and cron ------------------------------
async def test_each_worker_flushes_and_sweeps_in_the_background(make_client, admin, monkeypatch):
    """Started by the first request on the loop; the polling agent keeps its tickets, the
    silent one loses its own, without anyone calling the sweep."""
    present = await run_sync(create_user, agent=True)
    silent = await run_sync(create_user, agent=True)
    kept = await run_sync(give, admin, present, 15, ago=2 * HOUR)  # at the cap: polls read
    lost = await run_sync(give, admin, silent, 3, ago=2 * HOUR)
    client = make_client(present.token)
    swept_on = []
    real = housekeeping.idle_agents_release

    def sweep(**kwargs):
        swept_on.append(threading.current_thread().name)
        return real(**kwargs)

    monkeypatch.setattr(housekeeping, "idle_agents_release", sweep)
    quick = {"SUPPORT_AGENT_IDLE_RELEASE_SECONDS": 1.2, "SUPPORT_PRESENCE_FLUSH_SECONDS": 0.2}
    with override_settings(**quick):
        deadline = time.monotonic() + 3.0  # 2.5 times the limit
        while time.monotonic() < deadline:
            assert len((await client.get("/api/agent/tickets/")).json()) == 15
            await asyncio.sleep(0.1)
        assert housekeeping._task.get_loop() is asyncio.get_running_loop()
        assert not housekeeping._task.done()
        await _stop_housekeeping()
        # its work ran on its own thread, which keeps no connection between runs
        loop = asyncio.get_running_loop()
        assert set(swept_on) == {"support-housekeeping_0"}
        held = await loop.run_in_executor(housekeeping._executor, lambda: connection.connection)
        assert held is None
    assert await run_sync(statuses, lost) == {pk: ("open", None) for pk in lost}
    assert await run_sync(held_ticket_ids, present.pk) == set(kept)
    row = await run_sync(AgentPresence.objects.get, agent_id=present.pk)
    assert row.last_seen >= timezone.now() - timedelta(seconds=1)
    assert [e[5]["reason"] for e in await run_sync(released_events, lost)] == ["agent_idle"] * 3


async def _stop_housekeeping():
    task = housekeeping._task
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the job running on its thread, if any, has ended
    await asyncio.get_running_loop().run_in_executor(housekeeping._executor, lambda: None)


def test_workers_of_a_real_server_sweep_one_at_a_time_and_keep_present_agents(admin):
    present, silent = create_user(agent=True), create_user(agent=True)
    kept = give(admin, present, 15, ago=2 * HOUR)
    lost = give(admin, silent, 3, ago=2 * HOUR)
    env = {"SUPPORT_AGENT_IDLE_RELEASE_SECONDS": "3", "SUPPORT_PRESENCE_FLUSH_SECONDS": "0.5"}
    with run_uvicorn(workers=2, env=env) as server:
        headers = {"Authorization": f"Token {present.token}"}
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=10) as client:
            deadline = time.monotonic() + 6.0  # twice the limit
            while time.monotonic() < deadline:
                answer = client.get("/api/agent/tickets/")
                assert answer.status_code == 200, answer.text
                assert len(answer.json()) == 15
                time.sleep(0.25)
    assert statuses(lost) == {pk: ("open", None) for pk in lost}
    assert held_ticket_ids(present.pk) == set(kept)
    assert len(released_events(lost)) == 3  # each once, whichever worker swept
    assert AgentPresence.objects.filter(agent_id=present.pk).exists()
    assert_invariants()


@pytest.mark.smoke
def test_the_command_releases_and_says_what(admin):
    silent = create_user(agent=True)
    ids = give(admin, silent, 2, ago=2 * HOUR)
    out = StringIO()
    call_command("release_idle_agents", stdout=out)  # off by default
    assert "Idle release is off" in out.getvalue()
    assert statuses(ids) == {pk: ("assigned", silent.pk) for pk in ids}

    out = StringIO()
    with override_settings(SUPPORT_AGENT_IDLE_RELEASE_SECONDS=HOUR):
        call_command("release_idle_agents", stdout=out)
    assert out.getvalue().splitlines() == [
        "Released 2 ticket(s) of 1 agent(s) silent for more than 3600 s:",
        f"  agent {silent.username} (id {silent.pk}): {ids[0]}, {ids[1]}",
    ]
    assert statuses(ids) == {pk: ("open", None) for pk in ids}

    out = StringIO()
    call_command("release_idle_agents", "--idle-seconds", "60", stdout=out)
    assert out.getvalue().strip() == "No agent silent for more than 60 s holds a ticket."


def test_the_command_line_for_cron_exits_0_and_leaves_a_running_sweep_alone(admin):
    silent = create_user(agent=True)
    ids = give(admin, silent, 1, ago=2 * HOUR)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": "release-idle-under-test-" + "k" * 40,
        "DATABASE_URL": database_url(),
        "SUPPORT_AGENT_IDLE_RELEASE_SECONDS": "3600",
    }

    def run():
        return subprocess.run(
            [sys.executable, "manage.py", "release_idle_agents"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    with outside(autocommit=False) as other:
        other.execute("SELECT pg_advisory_xact_lock(%s)", [SWEEP_LOCK])
        done = run()
        other.rollback()
    assert (done.returncode, done.stdout.strip()) == (
        0,
        "Another sweep is running: nothing released by this one.",
    ), done.stderr
    done = run()
    assert done.returncode == 0, done.stderr
    assert f"agent {silent.username} (id {silent.pk}): {ids[0]}" in done.stdout
    assert statuses(ids) == {ids[0]: ("open", None)}


# --- POST /api/agent/tickets/{id}/release/ ------------------------------------------------------
@pytest.mark.smoke
async def test_an_agent_hands_a_ticket_back_to_the_pool(make_client, admin, agent, other_agent):
    await run_sync(create_tickets, admin, 2)
    client = make_client(agent.token)
    held = (await client.get("/api/agent/tickets/")).json()
    ticket = held[0]["id"]

    answer = await client.post(f"/api/agent/tickets/{ticket}/release/")

    assert answer.status_code == 200, answer.text
    body = answer.json()
    # the ticket as the pool now has it: open, no agent; the rest as the agent saw it
    assert body == {
        **held[0],
        "status": "open",
        "assigned_to": None,
        "assigned_at": None,
        "updated_at": body["updated_at"],
        "version": held[0]["version"] + 1,
    }
    assert body["updated_at"] > held[0]["updated_at"]
    assert await run_sync(released_events, [ticket]) == [
        (
            ticket,
            agent.pk,
            agent.pk,
            "assigned",
            "open",
            {
                "assigned_to": [agent.pk, None],
                "status": ["assigned", "open"],
                "reason": "released_by_agent",
            },
        )
    ]
    assert await run_sync(held_ticket_ids, agent.pk) == {held[1]["id"]}
    # in the pool: the next agent's fetch takes it
    taken = (await make_client(other_agent.token).get("/api/agent/tickets/")).json()
    assert [t["id"] for t in taken] == [ticket]
    # the history says why, as the API shows it
    history = (await make_client(admin.token).get(f"/api/tickets/{ticket}/history/")).json()
    assert history[-2]["changes"]["reason"] == "released_by_agent"
    await run_sync(assert_invariants)


@pytest.mark.smoke
async def test_releasing_another_agents_or_an_unknown_ticket_is_404_and_changes_nothing(
    make_client, admin, agent, other_agent
):
    [theirs] = await run_sync(give, admin, other_agent, 1)
    [opened] = await run_sync(create_tickets, admin, 1)
    client = make_client(agent.token)
    before = await run_sync(db_state)
    for ticket in (theirs, opened.pk, 987654321):
        answer = await client.post(f"/api/agent/tickets/{ticket}/release/")
        assert (answer.status_code, answer.json()) == (404, NOT_YOURS), ticket
    # the move endpoint answers those the same
    moved = await client.post(
        "/api/agent/tickets/", json={"ticket_id": theirs, "status": "resolved"}
    )
    assert (moved.status_code, moved.json()) == (404, NOT_YOURS)
    assert await run_sync(db_state) == before


@pytest.mark.smoke
@pytest.mark.parametrize("status", ["resolved", "closed"])
async def test_releasing_a_resolved_or_closed_ticket_is_409_and_changes_nothing(
    make_client, admin, agent, status
):
    [ticket] = await run_sync(give, admin, agent, 1, status=status)
    before = await run_sync(db_state)
    answer = await make_client(agent.token).post(f"/api/agent/tickets/{ticket}/release/")
    assert answer.status_code == 409, answer.text
    assert answer.json() == {
        "detail": f"Cannot move a ticket from '{status}' to 'open'. Allowed next statuses: none.",
        "current_status": status,
        "allowed": [],
    }
    assert await run_sync(db_state) == before


@pytest.mark.smoke
async def test_release_needs_an_agents_token(make_client, admin, agent):
    [ticket] = await run_sync(give, admin, agent, 1)
    before = await run_sync(db_state)
    url = f"/api/agent/tickets/{ticket}/release/"
    anonymous = await make_client().post(url)
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"] == "Token"
    as_admin = await make_client(admin.token).post(url)
    assert (as_admin.status_code, as_admin.json()) == (
        403,
        {"detail": "Only agents may use this endpoint."},
    )
    assert await run_sync(db_state) == before


@pytest.mark.smoke
def test_a_release_is_one_transaction_of_nine_statements(admin, agent):
    [ticket] = give(admin, agent, 1)
    with CaptureQueriesContext(connection) as queries:
        answer = Client().post(
            f"/api/agent/tickets/{ticket}/release/", HTTP_AUTHORIZATION=f"Token {agent.token}"
        )
    assert answer.status_code == 200, answer.content
    # token; BEGIN, lock the agent, its role, lock the ticket, end its assignment, update it,
    # its event, COMMIT
    sql = [q["sql"] for q in queries.captured_queries]
    assert len(sql) == 9, json.dumps(sql, indent=1)
