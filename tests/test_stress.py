"""Stress with a history checker: the real server (uvicorn, two workers) on the throwaway
PostgreSQL, 56 agents and an admin for 30 seconds, every request and answer recorded.

Afterwards, from the database and the recorded history:

- no ticket ever had two active assignments: the partial unique index is there, the final state
  has none, and replaying each ticket's TicketEvents in id order (its commit order: every change
  of a ticket holds the ticket's row lock) never assigns a ticket that, per the replay, someone
  else still held;
- no agent ever held more than the cap in ``assigned``: a change to an agent's held set is made
  under that agent's row lock, so the agent's events in id order are in commit order and give
  its held set after every transaction;
- status and assignment agree on every ticket (tests.invariants, which also replays history);
- every answer of GET /api/agent/tickets/ was true: its set equals the agent's held set at some
  moment the request was being served (``tests.history.answer_was_held``);
- no 5xx, no transport error, every status one the contract allows at that moment;
- pg_stat_activity, sampled every 100 ms: the app never has more sessions than pool size x
  workers, and none is left ``idle in transaction`` at the end.
"""

import asyncio
import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
import pytest
from django.conf import settings
from django.db import connection

from support.models import Ticket, TicketAssignment
from tests.conftest import create_user
from tests.history import GONE, Call, history_problems, load_events, record, replay
from tests.invariants import assert_invariants
from tests.servers import (
    APP_NAME,
    psycopg_conninfo,
    release_test_connections,
    run_uvicorn,
    tcp_port_owner,
)

pytestmark = pytest.mark.django_db(transaction=True)

WORKERS = 2
POOL_MAX = 8  # DB_POOL_MAX_SIZE per worker
AGENTS = 56
DURATION = 30.0
# Requests in flight at once, all actors together. The server saturates this machine's two
# cores long before that (about 40 requests/s, 1-2 s each under this load), so the DB pool and
# lock timeouts are raised for the run: a 503 here can only be a real fault (a deadlock, a
# broken connection), not the queue of a saturated machine.
MAX_IN_FLIGHT = 64
# Enough for every agent's first 15 and then some: the pool runs dry during the run, after which
# agents below the cap compete for the admin's new tickets.
INITIAL_TICKETS = 1200
REQUEST_TIMEOUT = 40.0
SEED = 20240604
INTEGRITY_DETAIL = "A concurrent change conflicted with this one; try again."


def _rng(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311  (a reproducible load, not secrets)


@dataclass
class Load:
    client: httpx.AsyncClient
    admin: Any
    agents: list
    deadline: float
    gate: asyncio.Semaphore
    calls: list[Call] = field(default_factory=list)
    deactivated: set[int] = field(default_factory=set)

    def call(self, user, kind, method, path, body=None, target=None):
        return record(
            self.client, self.calls, user, kind, method, path, body, gate=self.gate, target=target
        )

    # --- agents ---------------------------------------------------------------------------
    def fetch(self, agent):
        return self.call(agent, "fetch", "GET", "/api/agent/tickets/")

    def move(self, agent, ticket_id, status):
        body = {"ticket_id": ticket_id, "status": status}
        return self.call(agent, "move", "POST", "/api/agent/tickets/", body)

    async def agent_loop(self, agent):
        rng = _rng(SEED + agent.pk)
        held: list[int] = []
        resolved: list[int] = []
        await asyncio.sleep(rng.uniform(0, 0.5))
        while time.monotonic() < self.deadline:
            if rng.random() < 0.2:
                # several of its own requests at once: fetches racing each other and moves
                batch = [self.fetch(agent) for _ in range(rng.randint(2, 4))]
                if held:
                    target = rng.choice(held)
                    batch += [self.move(agent, target, "resolved") for _ in range(2)]
                results = await asyncio.gather(*batch)
            else:
                results = [await self.fetch(agent)]
            if any(c.status == 401 for c in results):
                return  # deactivated by the admin
            fetched = [c for c in results if c.kind == "fetch" and c.status == 200]
            if fetched:
                held = [t["id"] for t in fetched[-1].json]
            resolved += [c.body["ticket_id"] for c in results if c.kind == "move" and c.ok]
            for ticket_id in rng.sample(held, k=min(len(held), rng.choice((0, 1, 1, 2)))):
                c = await self.move(agent, ticket_id, "resolved")
                if c.status == 401:
                    return
                if c.status == 200:
                    resolved.append(ticket_id)
            if resolved and rng.random() < 0.5:
                await self.move(agent, resolved.pop(0), "closed")
            if held and rng.random() < 0.05:
                await self.move(agent, rng.choice(held), "closed")  # refused: assigned -> closed
            await asyncio.sleep(rng.uniform(0, 0.05))

    # --- the admin ------------------------------------------------------------------------
    async def creator(self, n):
        rng = _rng(SEED - n)
        while time.monotonic() < self.deadline:
            body = {"title": f"stress {rng.random():.6f}", "priority": rng.choice(PRIORITIES)}
            await self.call(self.admin, "create", "POST", "/api/tickets/", body)
            await asyncio.sleep(rng.uniform(0, 0.04))

    def active_agent(self, rng):
        return rng.choice([a for a in self.agents if a.pk not in self.deactivated])

    async def meddler(self, n):
        """Reassigns, assigns from the pool, reopens, sends back to work, deletes."""
        rng = _rng(SEED * 7 + n)
        while time.monotonic() < self.deadline:
            status = rng.choice(("assigned", "assigned", "open", "resolved"))
            listing = await self.call(
                self.admin,
                "list",
                "GET",
                f"/api/tickets/?status={status}&page_size=50&ordering={rng.choice(ORDERINGS)}",
            )
            results = listing.json["results"] if listing.status == 200 else []
            if results:
                ticket_id = rng.choice(results)["id"]
                path = f"/api/tickets/{ticket_id}/"
                roll = rng.random()
                if roll < 0.1:
                    await self.call(self.admin, "delete", "DELETE", path)
                elif status == "resolved" and roll < 0.5:
                    # back to work: counts toward the holder's cap again
                    await self.call(self.admin, "patch", "PATCH", path, {"status": "assigned"})
                elif status != "open" and roll < 0.4:
                    await self.call(self.admin, "patch", "PATCH", path, {"status": "open"})
                else:
                    agent = self.active_agent(rng)
                    body = {"assigned_to": agent.pk}
                    await self.call(self.admin, "patch", "PATCH", path, body, target=agent.pk)
            await asyncio.sleep(rng.uniform(0, 0.03))

    async def deactivator(self, victims, started):
        for i, victim in enumerate(victims, start=1):
            when = started + DURATION * i / (len(victims) + 1)
            await asyncio.sleep(max(0.0, when - time.monotonic()))
            self.deactivated.add(victim.pk)
            path = f"/api/agents/{victim.pk}/"
            await self.call(self.admin, "deactivate", "DELETE", path, target=victim.pk)


ORDERINGS = ("-updated_at", "created_at", "-priority", "id", "-id")
PRIORITIES = ("low", "normal", "normal", "high", "urgent")


async def _drive(base_url, admin, agents, victims) -> list[Call]:
    # idle connections are dropped after 1 s, well before uvicorn's keep-alive timeout (5 s):
    # no request is sent on a connection the server is closing at that moment
    limits = httpx.Limits(
        max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT, keepalive_expiry=1
    )
    async with httpx.AsyncClient(
        base_url=base_url, timeout=REQUEST_TIMEOUT, limits=limits, trust_env=False
    ) as client:
        started = time.monotonic()
        load = Load(client, admin, agents, started + DURATION, asyncio.Semaphore(MAX_IN_FLIGHT))
        tasks = [load.agent_loop(a) for a in agents]
        tasks += [load.creator(n) for n in range(2)]
        tasks += [load.meddler(n) for n in range(3)]
        tasks.append(load.deactivator(victims, started))
        # every task stops at the deadline; requests are bounded by REQUEST_TIMEOUT
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=DURATION + 3 * REQUEST_TIMEOUT)
        return load.calls


class ActivitySampler(threading.Thread):
    """Counts the server's database sessions (and those idle in transaction) every 100 ms:
    the app's sessions opened by its workers, not by this test process (whose connections
    carry the same application_name)."""

    QUERY = """
        SELECT pid, client_port, state FROM pg_stat_activity
        WHERE application_name = %s AND datname = %s
    """

    def __init__(self, workers: list[int]):
        super().__init__(daemon=True)
        self.workers = workers
        self.owned: dict[int, bool] = {}  # backend pid -> a worker's session (ports stay)
        self.samples: list[tuple[float, int, int]] = []
        self.stopping = threading.Event()
        self.failure: BaseException | None = None
        self.dbname = connection.settings_dict["NAME"]
        self.conninfo = psycopg_conninfo("stress-sampler")

    def sample(self, conn) -> tuple[int, int]:
        states = []
        for pid, port, state in conn.execute(self.QUERY, (APP_NAME, self.dbname)).fetchall():
            if pid not in self.owned:
                self.owned[pid] = tcp_port_owner(port, self.workers) is not None
            if self.owned[pid]:
                states.append(state or "")
        total = len(states)
        idle_in_tx = sum(state.startswith("idle in transaction") for state in states)
        self.samples.append((time.time(), total, idle_in_tx))
        return total, idle_in_tx

    def run(self):
        try:
            with psycopg.connect(self.conninfo, autocommit=True) as conn:
                while not self.stopping.is_set():
                    self.sample(conn)
                    self.stopping.wait(0.1)
        except BaseException as exc:  # reported by the test
            self.failure = exc

    def stop(self):
        self.stopping.set()
        self.join(timeout=10)
        assert not self.is_alive(), "the pg_stat_activity sampler hung"
        assert self.failure is None, f"the sampler failed: {self.failure!r}"


def _allowed(call: Call, deactivation: dict[int, Call]) -> set[int]:
    """The statuses the contract allows for this call, given when agents were deactivated."""

    def deactivated_before_end(agent_id):
        d = deactivation.get(agent_id)
        return d is not None and call.end >= d.start

    allowed = {
        "fetch": {200},
        "move": {200, 404, 409},  # 404: taken away by the admin; 409: a move not allowed
        "create": {201},
        "list": {200},
        "patch": {200, 404, 409},  # 404: deleted meanwhile; 409: the cap or a rule
        "delete": {204, 404},
        "deactivate": {204},
    }[call.kind]
    if call.kind in ("fetch", "move") and deactivated_before_end(call.actor):
        allowed = allowed | {401}
    if call.kind == "patch" and call.target is not None and deactivated_before_end(call.target):
        allowed = allowed | {400}
    return allowed


def _summary(calls: list[Call], seconds: float) -> str:
    statuses = Counter((c.kind, c.status) for c in calls)
    latencies = sorted(c.end - c.start for c in calls)
    lines = [
        f"stress: {len(calls)} requests in {seconds:.1f}s = {len(calls) / seconds:.0f} req/s; "
        f"latency p50 {statistics.median(latencies) * 1000:.0f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms",
        "  " + ", ".join(f"{k} {s}: {n}" for (k, s), n in sorted(statuses.items(), key=str)),
    ]
    return "\n".join(lines)


def test_stress_two_workers_many_agents_and_an_admin_with_a_history_checker():
    cap = settings.SUPPORT_AGENT_MAX_TICKETS
    admin = create_user(staff=True)
    agents = [create_user(agent=True) for _ in range(AGENTS)]
    rng = _rng(SEED)
    Ticket.objects.bulk_create(
        Ticket(title=f"seed {n}", created_by=admin, priority=rng.randint(0, 3))
        for n in range(INITIAL_TICKETS)
    )
    victims = agents[-2:]  # deactivated by the admin during the run

    release_test_connections()
    env = {
        "DB_POOL_MAX_SIZE": str(POOL_MAX),
        "DB_POOL_MIN_SIZE": "1",
        "DB_POOL_TIMEOUT": "30",
        "DB_LOCK_TIMEOUT_MS": "20000",
        "DB_STATEMENT_TIMEOUT_MS": "30000",
        "SUPPORT_AGENT_MAX_TICKETS": str(cap),
    }
    with run_uvicorn(workers=WORKERS, env=env) as server:
        sampler = ActivitySampler(workers=server.worker_pids())
        sampler.start()
        try:
            began = time.monotonic()
            calls = asyncio.run(_drive(server.base_url, admin, agents, victims))
            seconds = time.monotonic() - began
        finally:
            sampler.stop()
        # every request has its answer: nothing may still be inside a transaction
        time.sleep(0.5)
        with psycopg.connect(sampler.conninfo, autocommit=True) as conn:
            at_end = [sampler.sample(conn) for _ in range(3)]
        server_log = server.log()
    print("\n" + _summary(calls, seconds))

    # --- the recorded answers ---
    no_answer = [c for c in calls if c.status is None]
    tail = "\n".join(server_log.splitlines()[-40:])
    assert not no_answer, f"{len(no_answer)} got no answer, e.g. {no_answer[:3]}\n{tail}"
    server_errors = [c for c in calls if c.status >= 500]
    assert not server_errors, f"{len(server_errors)} 5xx, e.g. {server_errors[:5]}\n{tail}"
    deactivation = {c.target: c for c in calls if c.kind == "deactivate"}
    assert set(deactivation) == {v.pk for v in victims}
    unexpected = [c for c in calls if c.status not in _allowed(c, deactivation)]
    assert not unexpected, f"{len(unexpected)} unexpected answers, e.g. {unexpected[:5]}"
    late = [
        c
        for c in calls
        if c.actor in deactivation and c.start > deactivation[c.actor].end and c.status != 401
    ]
    assert not late, f"a deactivated agent was still served: {late[:3]}"
    raced = [c for c in calls if c.status == 409 and c.json.get("detail") == INTEGRITY_DETAIL]
    assert not raced, f"the database's constraint had to refuse a change: {raced[:3]}"
    assert "constraint refused a change" not in server_log
    errors = [
        line
        for line in server_log.splitlines()
        if '"level": "ERROR"' in line or line.startswith("ERROR") or "Traceback" in line
    ]
    assert not errors, errors[:10]
    kinds = Counter(c.kind for c in calls if c.status in (200, 201, 204))
    assert kinds["fetch"] >= 3 * AGENTS, kinds
    assert kinds["move"] >= 2 * AGENTS, kinds
    assert min(kinds[k] for k in ("create", "list", "patch", "delete", "deactivate")) >= 1, kinds
    assert len(calls) / seconds >= 15, "the load was too light to prove anything"

    # --- the database's sessions ---
    assert len(sampler.samples) >= DURATION * 5, "pg_stat_activity was hardly sampled"
    sessions = max(total for _, total, _ in sampler.samples)
    assert 0 < sessions <= POOL_MAX * WORKERS, f"the app had {sessions} sessions at once"
    assert [idle for _, idle in at_end] == [0, 0, 0], f"idle in transaction at the end: {at_end}"

    # --- the committed state and its history ---
    assert_invariants()  # one active assignment, status agrees, the cap now, history replay
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'one_active_assignment_per_ticket'"
        )
        [(indexdef,)] = cursor.fetchall()
    assert "UNIQUE" in indexdef, indexdef
    assert "WHERE is_active" in indexdef, indexdef

    # the history: consistent chains, the cap after every transaction, true fetch answers
    events = load_events()
    problems, steps = history_problems(calls, cap, events)
    assert not problems, f"{len(problems)} problems, e.g. {problems[:10]}"
    most = max(len(step.held) for mine in steps.values() for step in mine)
    assert most == cap, "no agent ever reached the cap: the load proved little"
    state, _, _ = replay(events)
    for agent in agents:
        held_now = set(
            TicketAssignment.objects.filter(
                agent=agent, is_active=True, ticket__status="assigned"
            ).values_list("ticket_id", flat=True)
        )
        assert held_now == set(steps[agent.pk][-1].held), agent.pk
    # every assignment row has its event, and no event lacks its row
    rows = Counter(TicketAssignment.objects.values_list("ticket_id", flat=True))
    given = Counter(
        e["ticket_id"]
        for e in events
        if "assigned_to" in e["changes"]
        and e["changes"]["assigned_to"][1] is not None
        and state.get(e["ticket_id"]) != GONE
    )
    assert rows == given
    print(
        f"  history: {len(events)} events, {sum(len(m) - 1 for m in steps.values())} agent "
        f"transactions replayed; at most {most} held at once (cap {cap}); "
        f"{sum(1 for c in calls if c.kind == 'fetch' and c.ok)} fetch answers checked; "
        f"app sessions at most {sessions} "
        f"(limit {POOL_MAX * WORKERS}); {Ticket.objects.filter(status='open').count()} open "
        "tickets left"
    )

    # every write the server confirmed is in the history, once
    moves = Counter(c.actor for c in calls if c.kind == "move" and c.status == 200)
    moved = Counter(
        e["actor"] for e in events if e["kind"] == "status_changed" and e["actor"] != admin.pk
    )
    assert moves == moved
    created = sum(1 for c in calls if c.kind == "create" and c.status == 201)
    assert created == sum(1 for e in events if e["kind"] == "created")
    deleted = sum(1 for c in calls if c.kind == "delete" and c.status == 204)
    assert deleted == sum(1 for e in events if e["kind"] == "deleted")
