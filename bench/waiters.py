"""Work comes to the agent: 2,000 agents waiting for work at once, beside 2,000 agents polling.

    python -m bench.waiters                       # 2,000 agents, 50 tickets/s for 20 s
    python -m bench.waiters --agents 500 --arrivals 5 --out /tmp/waiters.json   # a short run

A throwaway PostgreSQL (durable, as installed; max_connections 300), the schema, an admin and
``--agents`` agents with tokens, the service on two uvicorn workers. Then:

1. **wait**: every agent asks ``GET /api/agent/tickets/?wait=60`` on a connection of its own,
   one after the other (so their order of arrival is known). With all of them waiting: each
   worker's threads, RSS and CPU over an idle spell, and the database's sessions. Then the
   admin creates ``--rate`` tickets a second for ``--arrivals`` seconds: for each ticket, the
   time from its creation request being sent to a waiter's answer holding it; each ticket must
   be answered to exactly one waiter; and for each answer, how many waiters that were still
   waiting had arrived before the one served (0: the longest waiter was served first; with
   two workers each serving its own longest waiter, 0 or 1 is expected).
2. **poll**: the tickets emptied, the same agents each ask ``GET /api/agent/tickets/`` once a
   second (keep-alive, spread over the second) while the same tickets arrive: the requests
   served per second, their latency, the time from creation to the poll that picks a ticket
   up, and the CPU of the workers and of PostgreSQL in both phases.

The client runs on the same machine (its CPU is not counted as the service's). Figures go to
``--out`` (JSON) and a markdown table beside it; docs/waiting.md holds a run's results.
"""

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import (  # noqa: E402
    DB,
    PG_SETTINGS,
    Database,
    machine,
    percentile,
    process_cpu,
    seed,
    setup_database,
    thread_count,
    token,
)
from tests.pg_cluster import start_cluster  # noqa: E402
from tests.servers import children, run_uvicorn  # noqa: E402

WAIT = 60  # seconds each waiter asks for: longer than the phase


def log(message: str) -> None:
    print(f"[waiters {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- A minimal HTTP/1.1 client: thousands of keep-alive connections cost little ------------
class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Connection":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def request(self, method: str, path: str, auth: str, body: bytes = b"") -> tuple:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {auth}\r\n"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        await self.writer.drain()
        line = await self.reader.readline()
        if not line:
            raise ConnectionError("the server closed the connection")
        status = int(line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, json.loads(await self.reader.readexactly(length)) if length else None

    def close(self) -> None:
        self.writer.close()


# --- Sampling the server ----------------------------------------------------------------------
def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Peaks:
    """The most threads seen in each worker and database sessions seen, every 50 ms."""

    def __init__(self, db: Database, workers: list[int]):
        self.db, self.workers = db, workers
        self.threads = dict.fromkeys(workers, 0)
        self.sessions = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.db.connect() as conn:
            while not self._stop.wait(0.05):
                for pid in self.workers:
                    self.threads[pid] = max(self.threads[pid], thread_count(pid))
                conn.execute("SELECT pg_stat_clear_snapshot()")
                self.sessions = max(self.sessions, sessions(conn))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"threads_peak": list(self.threads.values()), "pg_sessions_peak": self.sessions}


def sessions(conn) -> int:
    return conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
        " AND backend_type = 'client backend' AND application_name <> 'bench'",
        (DB,),
    ).fetchone()[0]


def workers_of(server_port: int, client_ports: list[int], workers: list[int]) -> list[int]:
    """The worker holding each client's connection (from /proc: the accepted socket whose
    peer is the client's port, and the worker that has that socket open)."""
    inode_of = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                local, remote = fields[1], fields[2]
                if int(local.rsplit(":", 1)[1], 16) == server_port:
                    inode_of[int(remote.rsplit(":", 1)[1], 16)] = fields[9]
    owner = {}
    for pid in workers:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[link[8:-1]] = pid
    return [owner.get(inode_of.get(port), 0) for port in client_ports]


def waiting_agents(base_url: str) -> float:
    body = httpx.get(f"{base_url}/metrics", timeout=10).text
    return sum(float(x.split()[1]) for x in body.splitlines() if x.startswith("support_waiting_"))


class Cpu:
    """CPU seconds of the workers and of PostgreSQL's processes over a spell, in cores."""

    def __init__(self, workers: list[int], postmaster: int):
        self.workers, self.postmaster = workers, postmaster

    def __enter__(self):
        self.start = time.monotonic()
        self.app = process_cpu(self.workers)
        self.pg = process_cpu(children(self.postmaster))
        return self

    def __exit__(self, *exc):
        spell = time.monotonic() - self.start
        self.app_cores = (process_cpu(self.workers) - self.app) / spell
        # backends that ended during the spell are not counted: none should
        self.pg_cores = (process_cpu(children(self.postmaster)) - self.pg) / spell


def ahead_summary(ahead: list[int]) -> dict:
    if not ahead:
        return {}
    ordered = sorted(ahead)
    return {
        "p50": percentile(ordered, 50),
        "p99": percentile(ordered, 99),
        "max": ordered[-1],
        "zero_share": round(ordered.count(0) / len(ordered), 3),
    }


def summary(values_ms: list[float]) -> dict:
    values = sorted(values_ms)
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "p50_ms": round(percentile(values, 50), 1),
        "p90_ms": round(percentile(values, 90), 1),
        "p99_ms": round(percentile(values, 99), 1),
        "max_ms": round(values[-1], 1),
    }


# --- The arrivals -----------------------------------------------------------------------------
async def arrivals(
    port: int, admin: str, rate: float, seconds: float, refused: list | None = None
) -> dict[int, float]:
    """Create ``rate`` tickets a second for ``seconds`` on a schedule: each creation is sent
    at its time on one of a few connections, whether or not earlier ones were answered (an
    overloaded service makes them late, not fewer): ticket id -> when its creation request
    was sent (monotonic). A creation the service refuses (503) is counted in ``refused`` when
    given."""
    free: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(32):
        free.put_nowait(await Connection.open(port))
    sent: dict[int, float] = {}

    async def create(n: int) -> None:
        conn = await free.get()
        try:
            at = time.monotonic()
            body = json.dumps({"title": f"arrival {n}"}).encode()
            status, ticket = await conn.request("POST", "/api/tickets/", admin, body)
        finally:
            free.put_nowait(conn)
        if status == 503 and refused is not None:
            refused.append(n)
        elif status != 201:
            raise RuntimeError(f"creation answered {status}: {ticket}")
        else:
            sent[ticket["id"]] = at

    start = time.monotonic()
    tasks = []
    for n in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        tasks.append(asyncio.create_task(create(n)))
    await asyncio.gather(*tasks)
    while not free.empty():
        free.get_nowait().close()
    return sent


def answered_early(tasks: list[asyncio.Task]) -> None:
    """No waiter is answered before tickets arrive: one that was (an error) ends the run."""
    for task in tasks:
        if task.done():
            raise RuntimeError(f"a waiter was answered before any ticket: {task.exception()!r}")


# --- Phase 1: waiting ---------------------------------------------------------------------------
async def wait_phase(args, server, db, users, workers, postmaster) -> dict:
    agents = [users["first_agent"] + n for n in range(args.agents)]
    base = {pid: rss_kib(pid) for pid in workers}
    threads_before = [thread_count(pid) for pid in workers]
    peaks = Peaks(db, workers)
    answers: dict[int, tuple[float, list[int]]] = {}  # waiter number -> (answered at, ids)
    started: list[float] = []

    async def waiter(n: int, conn: Connection) -> None:
        status, body = await conn.request(
            "GET", f"/api/agent/tickets/?wait={WAIT}", token(agents[n])
        )
        if status != 200:
            raise RuntimeError(f"waiter {n} answered {status}: {body}")
        answers[n] = (time.monotonic(), [t["id"] for t in body])

    conns = [await Connection.open(server.port) for _ in agents]
    tasks = []
    for n, conn in enumerate(conns):
        started.append(time.monotonic())
        tasks.append(asyncio.create_task(waiter(n, conn)))
        if n % 50 == 49:  # in order: the waiters of a batch reach the workers together
            while waiting_agents(server.base_url) < n + 1:
                answered_early(tasks)
                await asyncio.sleep(0.01)
    while waiting_agents(server.base_url) < len(agents):
        answered_early(tasks)
        await asyncio.sleep(0.05)
    log(f"{len(agents)} agents waiting")
    await asyncio.sleep(2)  # settle
    rss = {pid: rss_kib(pid) for pid in workers}
    ports = [c.writer.get_extra_info("sockname")[1] for c in conns]
    worker_of = workers_of(server.port, ports, workers)
    with db.connect() as conn:
        waiting_sessions = sessions(conn)
    with Cpu(workers, postmaster) as idle:
        await asyncio.sleep(args.idle)
    log(f"idle: workers {idle.app_cores * 100:.2f} % of a core, RSS {rss} KiB")

    with Cpu(workers, postmaster) as busy:
        sent = await arrivals(server.port, token(users["admin"]), args.rate, args.arrivals)
        await asyncio.sleep(1.5)  # the last answers
    got: dict[int, list[int]] = {}
    for n, (_, ids) in answers.items():
        for ticket in ids:
            got.setdefault(ticket, []).append(n)
    latencies = [
        (answers[got[t][0]][0] - at) * 1000 for t, at in sent.items() if len(got.get(t, [])) == 1
    ]
    # the longest waiter first: for each answer in order, the waiters still waiting that
    # arrived before the one served, on its own worker and on any
    order = sorted(answers, key=lambda n: answers[n][0])
    still = set(range(len(agents)))
    ahead, ahead_same = [], []
    for n in order:
        ahead.append(sum(1 for m in still if m < n))
        ahead_same.append(sum(1 for m in still if m < n and worker_of[m] == worker_of[n]))
        still.discard(n)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for conn in conns:
        conn.close()
    peak = peaks.stop()
    per_waiter = sum(rss[pid] - base[pid] for pid in workers) * 1024 / len(agents)
    return {
        "agents": len(agents),
        "threads_before": threads_before,
        **peak,
        "pg_sessions_while_waiting": waiting_sessions,
        "rss_base_kib": list(base.values()),
        "rss_waiting_kib": list(rss.values()),
        "rss_per_waiter_bytes": round(per_waiter),
        "idle_cpu_cores": round(idle.app_cores, 4),
        "idle_pg_cpu_cores": round(idle.pg_cores, 4),
        "arrivals_cpu_cores": round(busy.app_cores, 3),
        "arrivals_pg_cpu_cores": round(busy.pg_cores, 3),
        "created": len(sent),
        "claimed_once": sum(1 for t in sent if len(got.get(t, [])) == 1),
        "claimed_twice_or_more": sum(1 for t in sent if len(got.get(t, [])) > 1),
        "unclaimed": sum(1 for t in sent if t not in got),
        "answered": len(answers),
        "latency": summary(latencies),
        "waiters_per_worker": [worker_of.count(pid) for pid in workers],
        "served_ahead_same_worker": ahead_summary(ahead_same),
        "served_ahead_any_worker": ahead_summary(ahead),
    }


# --- Phase 2: polling ---------------------------------------------------------------------------
async def poll_phase(args, server, db, users, workers, postmaster) -> dict:
    agents = [users["first_agent"] + n for n in range(args.agents)]
    picked: dict[int, float] = {}  # ticket id -> first poll answer holding it
    polls: list[float] = []
    failures = 0
    stop = asyncio.Event()

    async def poller(n: int, conn: Connection) -> None:
        nonlocal failures
        await asyncio.sleep(random.random())  # noqa: S311 (spread over the second)
        due = time.monotonic()
        while not stop.is_set():
            at = time.monotonic()
            status, body = await conn.request("GET", "/api/agent/tickets/", token(agents[n]))
            done = time.monotonic()
            polls.append((done - at) * 1000)
            if status != 200:
                failures += 1
            else:
                for t in body:
                    picked.setdefault(t["id"], done)
            due += 1.0
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    conns = [await Connection.open(server.port) for _ in agents]
    peaks = Peaks(db, workers)
    tasks = [asyncio.create_task(poller(n, c)) for n, c in enumerate(conns)]
    await asyncio.sleep(3)  # every poller under way
    polls.clear()
    with db.connect() as conn:
        commits = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (DB,)
        ).fetchone()[0]
    start = time.monotonic()
    refused: list[int] = []
    with Cpu(workers, postmaster) as busy:
        sent = await arrivals(server.port, token(users["admin"]), args.rate, args.arrivals, refused)
        await asyncio.sleep(2)
    spell = time.monotonic() - start
    served = len(polls)
    with db.connect() as conn:
        commits = (
            conn.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (DB,)
            ).fetchone()[0]
            - commits
        )
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    for conn in conns:
        conn.close()
    peak = peaks.stop()
    pickup = [(picked[t] - at) * 1000 for t, at in sent.items() if t in picked]
    return {
        "agents": len(agents),
        "asked_rps": len(agents),
        "served_rps": round(served / spell, 1),
        "non_200": failures,
        "poll_latency": summary(polls),
        "pickup_latency": summary(pickup),
        "created": len(sent),
        "creations_refused_503": len(refused),
        "picked_up": len(pickup),
        "app_cpu_cores": round(busy.app_cores, 3),
        "pg_cpu_cores": round(busy.pg_cores, 3),
        "pg_commits_per_s": round(commits / spell, 1),
        **peak,
    }


def postmaster_pid(datadir: str) -> int:
    return int(Path(datadir, "postmaster.pid").read_text().split()[0])


def service_env(cluster, label: str, **extra: str) -> dict:
    """The service's environment for these benchmarks: production settings but for the
    host, on the throwaway cluster's database, default pool, warnings only in the log."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": "benchmark-only-" + "k" * 40,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
        "DJANGO_SECURE_SSL_REDIRECT": "0",
        "DATABASE_URL": cluster.url(DB),
        "DB_POOL_MIN_SIZE": "1",
        "DB_POOL_MAX_SIZE": "10",
        "LOG_LEVEL": "WARNING",
        "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix=f"{label}-metrics-"),
        **extra,
    }


def empty_tickets(db: Database) -> None:
    db.execute("TRUNCATE support_ticketevent, support_ticketassignment, support_ticket")


async def main_async(args) -> dict:
    cluster = start_cluster(PG_SETTINGS)
    env = service_env(cluster, "waiters", METRICS_PUBLIC="1")
    db = setup_database(cluster, env)
    users = seed(db, args.agents)
    db.execute("VACUUM ANALYZE")
    postmaster = postmaster_pid(cluster.datadir)
    log(f"seeded {args.agents} agents")
    with run_uvicorn(workers=2, env=env) as server:
        workers = server.worker_pids()
        # warm both workers (imports, pools, the listening connection) before the baseline
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            for n in range(40):
                await client.get(
                    "/api/agent/tickets/?wait=0.01",
                    headers={"Authorization": token(users["first_agent"] + n)},
                )
        wait = await wait_phase(args, server, db, users, workers, postmaster)
        log(f"wait: {json.dumps(wait)}")
        empty_tickets(db)
        poll = await poll_phase(args, server, db, users, workers, postmaster)
        log(f"poll: {json.dumps(poll)}")
    cluster.stop()
    return {
        "machine": machine(),
        "args": vars(args) | {"out": str(args.out)},
        "wait": wait,
        "poll": poll,
    }


def markdown(data: dict) -> str:
    w, p = data["wait"], data["poll"]
    lat, pick = w["latency"], p["pickup_latency"]
    wait_ms = f"{lat.get('p50_ms')} / {lat.get('p99_ms')}"
    poll_ms = f"{pick.get('p50_ms')} / {pick.get('p99_ms')}"
    rows = [
        ("agents", w["agents"], p["agents"]),
        ("requests/s asked / served", "—", f"{p['asked_rps']} / {p['served_rps']}"),
        ("non-2xx", 0, f"{p['non_200']} polls, {p['creations_refused_503']} creations"),
        ("threads per worker, peak", w["threads_peak"], p["threads_peak"]),
        ("PostgreSQL sessions, peak", w["pg_sessions_peak"], p["pg_sessions_peak"]),
        ("worker CPU, idle (cores)", w["idle_cpu_cores"], "—"),
        ("worker CPU during arrivals (cores)", w["arrivals_cpu_cores"], p["app_cpu_cores"]),
        ("PostgreSQL CPU during arrivals (cores)", w["arrivals_pg_cpu_cores"], p["pg_cpu_cores"]),
        ("creation → answer p50 / p99 (ms)", wait_ms, poll_ms),
        ("tickets created / each claimed once", f"{w['created']} / {w['claimed_once']}",
         f"{p['created']} / {p['picked_up']}"),
        ("RSS per waiter (bytes)", w["rss_per_waiter_bytes"], "—"),
    ]  # fmt: skip
    lines = ["| | wait | poll once a second |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    same, anyw = w["served_ahead_same_worker"], w["served_ahead_any_worker"]
    lines.append("")
    lines.append(
        f"Longest waiter first ({w['waiters_per_worker']} waiters per worker): for each answer, "
        f"the waiters still waiting that had arrived before the one served — on its own "
        f"worker: max {same.get('max')} ({same.get('zero_share', 0) * 100:.1f} % zero); on "
        f"either worker: p50 {anyw.get('p50')}, p99 {anyw.get('p99')}, max {anyw.get('max')}."
    )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=50.0, help="tickets created per second")
    parser.add_argument("--arrivals", type=float, default=20.0, help="seconds of arrivals")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "waiting.json")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.arrivals + args.idle + 10 > WAIT:
        raise SystemExit(f"--arrivals + --idle must leave the waiters' {WAIT} s some room")
    write(args.out, asyncio.run(main_async(args)), markdown)


def write(out: Path, data: dict, markdown) -> None:
    """The figures as JSON at ``out``, and their table beside it (``.table.md``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".table.md").write_text(markdown(data))
    print(f"wrote {out}", flush=True)
    print(markdown(data))


if __name__ == "__main__":
    main()
