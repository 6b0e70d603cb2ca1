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
- half the creates and moves carry an Idempotency-Key, and some of those are sent again with it
  (two at once, again at once, again a while later): per key one send did the work, every
  replay is its answer byte for byte, a 409 "still running" came only while it ran, never a
  422 (``tests.history.key_problems``); half the admin's edits and some moves carry If-Match
  (the version the caller last saw): every 412 carried the ticket's newer ETag;
- every answered write made exactly the event its ETag names, and nothing else did: a replay,
  a refusal or a 412 changed nothing, each create made one ticket (its title is unique), and
  every ticket's version is its events' count (``tests.history.effect_problems``);
- pg_stat_activity, sampled every 100 ms: the app never has more sessions than pool size x
  workers, and none is left ``idle in transaction`` at the end.
"""

import asyncio
import itertools
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
from tests.history import (
    GONE,
    Call,
    effect_problems,
    history_problems,
    key_in_use,
    key_problems,
    load_events,
    record,
    replay,
    replayed,
    version_problems,
)
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
    keys: itertools.count = field(default_factory=itertools.count)
    retries: list[asyncio.Task] = field(default_factory=list)  # sends again, a while later

    def call(self, user, kind, method, path, body=None, target=None, **headers):
        return record(
            self.client,
            self.calls,
            user,
            kind,
            method,
            path,
            body,
            gate=self.gate,
            target=target,
            **headers,
        )

    async def write(self, rng, user, kind, path, body, if_match=None, twice=False) -> Call:
        """A POST that changes something. Half carry an Idempotency-Key; of those, some are
        sent twice at once (one runs, the other gets its answer or a 409 "still running", and
        is sent again a second later, as Retry-After says), some again as soon as the answer
        came (as if it had been lost), some again a while later. ``twice``: sent twice at once,
        keyed or not. Returns the send that ran (the first one without a key)."""
        if rng.random() < 0.5:
            if twice:
                pair = [self.call(user, kind, "POST", path, body, if_match=if_match) for _ in "ab"]
                return (await asyncio.gather(*pair))[0]
            return await self.call(user, kind, "POST", path, body, if_match=if_match)
        key = f"{kind}-{user.pk}-{next(self.keys)}"

        def send():
            return self.call(user, kind, "POST", path, body, key=key, if_match=if_match)

        roll = rng.random()
        if twice or roll < 0.15:
            pair = await asyncio.gather(send(), send())
            if any(key_in_use(c) for c in pair):
                self.later(1.0, send)
            return next((c for c in pair if not key_in_use(c)), pair[0])
        first = await send()
        if roll < 0.3:
            await send()
        elif roll < 0.45:
            self.later(rng.uniform(0.1, 2.0), send)
        return first

    def later(self, delay: float, send) -> None:
        async def again():
            await asyncio.sleep(delay)
            await send()

        self.retries.append(asyncio.ensure_future(again()))

    # --- agents ---------------------------------------------------------------------------
    def fetch(self, agent):
        return self.call(agent, "fetch", "GET", "/api/agent/tickets/")

    def move(self, rng, agent, ticket_id, status, version=None, twice=False):
        """A quarter of the moves whose version the agent knows send it in If-Match."""
        body = {"ticket_id": ticket_id, "status": status}
        if_match = None
        if version is not None and rng.random() < 0.25:
            if_match = f'"{ticket_id}.{version}"'
        return self.write(rng, agent, "move", "/api/agent/tickets/", body, if_match, twice)

    async def agent_loop(self, agent):
        rng = _rng(SEED + agent.pk)
        held: list[int] = []
        resolved: list[int] = []
        versions: dict[int, int] = {}  # as the agent last saw them
        await asyncio.sleep(rng.uniform(0, 0.5))
        while time.monotonic() < self.deadline:
            if rng.random() < 0.2:
                # several of its own requests at once: fetches racing each other and moves
                batch = [self.fetch(agent) for _ in range(rng.randint(2, 4))]
                if held:
                    target = rng.choice(held)
                    version = versions.get(target)
                    # the same move twice at once, racing the fetches for the agent's lock
                    batch.append(self.move(rng, agent, target, "resolved", version, twice=True))
                results = await asyncio.gather(*batch)
            else:
                results = [await self.fetch(agent)]
            if any(c.status == 401 for c in results):
                return  # deactivated by the admin
            fetched = [c for c in results if c.kind == "fetch" and c.status == 200]
            if fetched:
                held = [t["id"] for t in fetched[-1].json]
                versions.update((t["id"], t["version"]) for t in fetched[-1].json)
            for c in results:
                if c.kind == "move" and c.ok:
                    resolved.append(c.body["ticket_id"])
                    versions[c.body["ticket_id"]] = c.json["version"]
            for ticket_id in rng.sample(held, k=min(len(held), rng.choice((0, 1, 1, 2)))):
                c = await self.move(rng, agent, ticket_id, "resolved", versions.get(ticket_id))
                if c.status == 401:
                    return
                if c.status == 200:
                    resolved.append(ticket_id)
                    versions[ticket_id] = c.json["version"]
            resolved = list(dict.fromkeys(resolved))  # a replayed move is the same move
            if resolved and rng.random() < 0.5:
                ticket_id = resolved.pop(0)
                await self.move(rng, agent, ticket_id, "closed", versions.get(ticket_id))
            if held and rng.random() < 0.05:
                # refused: assigned -> closed
                await self.move(rng, agent, rng.choice(held), "closed")
            await asyncio.sleep(rng.uniform(0, 0.05))

    # --- the admin ------------------------------------------------------------------------
    async def creator(self, n):
        rng = _rng(SEED - n)
        for i in itertools.count():
            if time.monotonic() >= self.deadline:
                break
            # a title of its own: how many tickets one create made is counted by it
            title = f"stress {n}.{i} {rng.random():.6f}"
            body = {"title": title, "priority": rng.choice(PRIORITIES)}
            await self.write(rng, self.admin, "create", "/api/tickets/", body)
            await asyncio.sleep(rng.uniform(0, 0.04))

    def active_agent(self, rng):
        return rng.choice([a for a in self.agents if a.pk not in self.deactivated])

    async def meddler(self, n):
        """Reassigns, assigns from the pool, reopens, sends back to work, deletes; half the
        time with If-Match naming the version the listing showed (or, now and then, the one
        before it). A fifth of the time it acts on an earlier listing (a page left open), whose
        versions are likelier stale."""
        rng = _rng(SEED * 7 + n)
        earlier = None
        while time.monotonic() < self.deadline:
            if earlier is not None and rng.random() < 0.2:
                status, results = earlier
            else:
                status = rng.choice(("assigned", "assigned", "open", "resolved"))
                query = f"status={status}&page_size=50&ordering={rng.choice(ORDERINGS)}"
                listing = await self.call(self.admin, "list", "GET", f"/api/tickets/?{query}")
                results = listing.json["results"] if listing.status == 200 else []
                earlier = (status, results)
            if results:
                row = rng.choice(results)
                ticket_id = row["id"]
                path = f"/api/tickets/{ticket_id}/"
                seen = {"if_match": None}
                read = rng.random()
                if read < 0.5:
                    # mostly the listed version; now and then an older read's
                    version = row["version"] - (read < 0.15)
                    seen["if_match"] = f'"{ticket_id}.{version}"'
                roll = rng.random()
                if roll < 0.1:
                    await self.call(self.admin, "delete", "DELETE", path, **seen)
                elif status == "resolved" and roll < 0.5:
                    # back to work: counts toward the holder's cap again
                    body = {"status": "assigned"}
                    await self.call(self.admin, "patch", "PATCH", path, body, **seen)
                elif status != "open" and roll < 0.4:
                    body = {"status": "open"}
                    await self.call(self.admin, "patch", "PATCH", path, body, **seen)
                else:
                    agent = self.active_agent(rng)
                    body = {"assigned_to": agent.pk}
                    await self.call(
                        self.admin, "patch", "PATCH", path, body, target=agent.pk, **seen
                    )
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
        # the later sends (at most 2 s late), then the sends a second after a 409 those made
        while load.retries:
            pending, load.retries = load.retries, []
            await asyncio.wait_for(asyncio.gather(*pending), timeout=3 + REQUEST_TIMEOUT)
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
    if call.kind in ("move", "patch", "delete") and call.if_match is not None:
        allowed = allowed | {412}  # the ticket changed since the caller saw it
    if key_in_use(call) and call.key is not None:
        allowed = allowed | {409}  # when: tests.history.key_problems
    return allowed


def _summary(calls: list[Call], seconds: float) -> str:
    statuses = Counter((c.kind, c.status) for c in calls)
    keyed = [c for c in calls if c.key is not None]
    latencies = sorted(c.end - c.start for c in calls)
    lines = [
        f"stress: {len(calls)} requests in {seconds:.1f}s = {len(calls) / seconds:.0f} req/s; "
        f"latency p50 {statistics.median(latencies) * 1000:.0f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms",
        "  " + ", ".join(f"{k} {s}: {n}" for (k, s), n in sorted(statuses.items(), key=str)),
        f"  keyed: {len(keyed)} sends of {len({(c.actor, c.key) for c in keyed})} keys, "
        f"{sum(map(replayed, keyed))} replayed, {sum(map(key_in_use, keyed))} 409 still running; "
        f"If-Match: {sum(c.if_match is not None for c in calls)} sent, "
        f"{sum(c.status == 412 for c in calls)} 412",
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
    kinds = Counter(c.kind for c in calls if c.status in (200, 201, 204) and not replayed(c))
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

    # every write the server confirmed is in the history, once (a replay confirms the first)
    moves = Counter(
        c.actor for c in calls if c.kind == "move" and c.status == 200 and not replayed(c)
    )
    moved = Counter(
        e["actor"] for e in events if e["kind"] == "status_changed" and e["actor"] != admin.pk
    )
    assert moves == moved
    created = sum(1 for c in calls if c.kind == "create" and c.status == 201 and not replayed(c))
    assert created == sum(1 for e in events if e["kind"] == "created")
    deleted = sum(1 for c in calls if c.kind == "delete" and c.status == 204)
    assert deleted == sum(1 for e in events if e["kind"] == "deleted")

    # --- Idempotency-Key, versions and preconditions ---
    problems = key_problems(calls)
    assert not problems, f"{len(problems)} problems, e.g. {problems[:10]}"
    versions = dict(Ticket.objects.values_list("id", "version"))
    problems = version_problems(events, versions) + effect_problems(calls, events, admin.pk)
    assert not problems, f"{len(problems)} problems, e.g. {problems[:10]}"
    # each create made one ticket, however often it was sent: its title is its own
    titles = Counter(e["changes"]["title"][1] for e in events if e["kind"] == "created")
    sent = {c.body["title"] for c in calls if c.kind == "create"}
    assert set(titles) <= sent
    assert not [t for t, n in titles.items() if n > 1], titles.most_common(3)
    for c in calls:
        if c.kind == "create" and c.status == 201:
            assert titles[c.body["title"]] == 1, c
    # the load exercised what was checked
    keyed = [c for c in calls if c.key is not None]
    # (one admin creates a ticket every half second or so; agents move a hundred times more)
    for kind, least in (("create", 2), ("move", 50)):
        assert sum(c.kind == kind and replayed(c) for c in keyed) >= least, kind
    assert sum(c.status == 412 for c in calls if c.kind in ("patch", "delete")) >= 2
    assert sum(c.status == 412 for c in calls if c.kind == "move") >= 3


# --- the checker's own tests: each breach it is there to find, it finds --------------------------
REPLAYED = {"idempotent-replayed": "true"}
IN_USE = {"retry-after": "1"}
CREATED = b'{"id":7,"version":1}'


def _sent(kind, status, start, end, *, key="k", headers=None, content=CREATED, **fields) -> Call:
    method = {"create": "POST", "move": "POST", "patch": "PATCH"}[kind]
    path = "/api/tickets/7/" if kind == "patch" else "/api/tickets/"
    fields.setdefault("body", {"title": "t"})
    call = Call(
        fields.pop("actor", 1), kind, method, path, start=start, end=end, status=status, **fields
    )
    call.key, call.content = key, content
    call.headers = {"etag": '"7.1"', **(headers or {})} if status == 201 else dict(headers or {})
    return call


@pytest.mark.smoke
def test_the_key_checker_finds_a_second_effect_a_changed_replay_and_a_misplaced_409():
    first = _sent("create", 201, 1.0, 2.0)
    clean = [
        first,
        _sent("create", 409, 1.5, 1.6, headers=IN_USE, content=b"{}"),  # while the first ran
        _sent("create", 201, 2.5, 3.0, headers=REPLAYED),
        _sent("create", 401, 4.0, 4.1, content=b"{}"),  # the checks refused it: not stored
    ]
    assert key_problems(clean) == []
    breaches = {
        "a second effect": _sent("create", 201, 5.0, 6.0),
        "another answer replayed": _sent(
            "create", 201, 5.0, 6.0, headers=REPLAYED, content=b'{"id":8,"version":1}'
        ),
        "409 after the first answered": _sent("create", 409, 2.1, 2.2, headers=IN_USE),
        "422 for a true repeat": _sent("create", 422, 5.0, 6.0, content=b"{}"),
        "a check's refusal replayed": _sent("create", 401, 5.0, 6.0, headers=REPLAYED),
        "an unkeyed replay": _sent("create", 201, 5.0, 6.0, key=None, headers=REPLAYED),
        "another request sent under the key": _sent(
            "create", 201, 5.0, 6.0, headers=REPLAYED, body={"title": "u"}
        ),
    }
    for breach, call in breaches.items():
        assert key_problems([*clean, call]), breach
    # in use, or replayed, with no send that ran
    assert key_problems([_sent("create", 409, 1.0, 2.0, headers=IN_USE)])


def _event(event_id, kind, actor, at, to_status="", **changes) -> dict:
    return {
        "id": event_id,
        "ticket_id": 7,
        "kind": kind,
        "actor": actor,
        "at": at,
        "to_status": to_status,
        "agent": 5,
        "changes": changes,
    }


@pytest.mark.smoke
def test_the_effect_checker_finds_an_edit_a_412_made_and_a_move_made_twice():
    admin, agent = 100, 5
    events = [
        _event(1, "created", admin, 1.5, "open", title=[None, "t"]),
        _event(2, "assigned", agent, 3.0, "assigned"),  # a fetch: version 2
        _event(3, "status_changed", agent, 4.5, "resolved"),  # version 3
    ]
    move = {"ticket_id": 7, "status": "resolved"}
    calls = [
        _sent("create", 201, 1.0, 2.0, actor=admin, json={"id": 7, "version": 1}),
        _sent(
            "move",
            200,
            4.0,
            5.0,
            actor=agent,
            body=move,
            json={"id": 7, "version": 3},
            headers={"etag": '"7.3"'},
        ),
        _sent(
            "move",
            200,
            5.5,
            5.6,
            actor=agent,
            body=move,
            json={"id": 7, "version": 3},
            headers={"etag": '"7.3"', **REPLAYED},
        ),
        _sent(
            "patch",
            412,
            6.0,
            7.0,
            actor=admin,
            body={"status": "open"},
            if_match='"7.2"',
            headers={"etag": '"7.3"'},
        ),
    ]
    assert effect_problems(calls, events, admin) == []
    assert version_problems(events, {7: 3}) == []
    assert version_problems(events, {7: 4})  # a write without its event
    assert version_problems(events, {})  # gone without its deletion
    stale = calls[3]
    breaches = {
        "a 412 that changed the ticket": (
            calls,
            [*events, _event(4, "status_changed", admin, 6.5, "open")],
        ),
        "a move made twice": (calls, [*events, _event(4, "status_changed", agent, 5.55, "closed")]),
        "a 412 without the ETag": (
            [
                *calls[:3],
                _sent("patch", 412, 6.0, 7.0, actor=admin, body={}, if_match=stale.if_match),
            ],
            events,
        ),
        "a 412 naming the version it was sent": (
            [
                *calls[:3],
                _sent(
                    "patch",
                    412,
                    6.0,
                    7.0,
                    actor=admin,
                    body={},
                    if_match='"7.3"',
                    headers={"etag": '"7.3"'},
                ),
            ],
            events,
        ),
        "a create answered with another ticket's version": (
            [_sent("create", 201, 1.0, 2.0, actor=admin, json={"id": 7, "version": 2}), *calls[1:]],
            events,
        ),
        "a creation nobody answered": (calls[1:], events),
    }
    for breach, (recorded, history) in breaches.items():
        assert effect_problems(recorded, history, admin), breach
