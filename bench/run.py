"""The benchmark: the service against PostgreSQL's own ceiling for the same work (bench/README.md).

One process drives everything: a throwaway PostgreSQL with default settings, the schema, bulk
seeding, the service under uvicorn, the floors under it (bench/floors.py), wrk for HTTP load,
pgbench for the two SQL ceilings, the samplers (database sessions, CPU, the workers' threads),
the service again on another interpreter (``--python``), and the report (JSON, markdown, PNG).
"""

import argparse
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import floors, interpreter  # noqa: E402
from tests.pg_cluster import Cluster, _find_bin, start_cluster  # noqa: E402
from tests.servers import Server, children, run_uvicorn  # noqa: E402

BENCH = ROOT / "bench"
DB = "bench"
APP_NAME = "support-tickets"
SCENARIOS = (
    "poll",
    "churn",
    "admin-list",
    "admin-create",
    "admin-create-keyed",
    "admin-create-replay",
)
# The floors (bench/floors.py) and their scenario names; "service" is /bench/floor/ on the
# service itself.
FLOORS = {
    "service": "floor",
    "django": "floor-django",
    "django-pooled": "floor-django-pooled",
    "asgi": "floor-asgi",
}
# The admin lists measured as history grows, each with its query string (admin_list.lua).
SEARCH_TERM = "E217"  # one error code of 250 in the seeded descriptions: 0.4 % of tickets
LISTS = {
    "admin-list": "page_size=20",
    "admin-list-open": "status=open&page_size=20",
    "admin-search": f"search={SEARCH_TERM}&page_size=20",
}
LUA = {
    "poll": "poll",
    "churn": "churn",
    "admin-list": "admin_list",
    "admin-list-open": "admin_list",
    "admin-search": "admin_list",
    "admin-create": "admin_create",
    "admin-create-keyed": "admin_create",
    "admin-create-replay": "admin_create",
    **{scenario: "floor" for scenario in FLOORS.values()},
}
# The Idempotency-Key each create sends (admin_create.lua): none, a new one per request, or
# one per connection with the same body every time (a retry, answered from the stored answer).
KEYS = {"admin-create": "", "admin-create-keyed": "fresh", "admin-create-replay": "repeat"}
# A number per run of wrk or pgbench, part of every Idempotency-Key it sends: keys never
# repeat from one run to the next (the database lives as long as this process).
RUN_IDS = itertools.count(1)
# Seeded tickets' text: a few words from a fixed vocabulary, chosen by the row's number, so
# that titles and descriptions vary and a search can be selective (see _ticket_text).
SUBJECTS = [
    "Printer", "Laptop", "Email", "VPN", "Invoice", "Password", "Monitor", "Calendar",
    "Backup", "Phone", "Badge", "Keyboard", "Website", "License", "Scanner", "Headset",
]  # fmt: skip
PROBLEMS = [
    "will not start", "is very slow", "shows an error", "stopped syncing",
    "keeps disconnecting", "cannot be opened", "was charged twice", "needs a reset",
    "is missing", "fails after the update", "looks broken", "asks for access again",
    "freezes at login",
]  # fmt: skip
PLACES = [
    "Berlin", "Lisbon", "Oslo", "Madrid", "Dublin", "Vienna", "Prague", "Warsaw", "Milan",
    "Lyon", "Porto",
]  # fmt: skip
WHEN = [
    "since Monday", "for the whole team", "after a restart", "only in the morning",
    "when working from home", "since the last update", "twice this week",
]  # fmt: skip
ERROR_CODES = 250  # E100 .. E349, evenly: each one in 1 ticket of 250
VOCABULARY = {"subjects": SUBJECTS, "problems": PROBLEMS, "places": PLACES, "when": WHEN}
# PostgreSQL as installed, but for what a benchmark on one machine needs: room for 256 pgbench
# clients, and a port and socket of its own.
PG_SETTINGS = {"max_connections": "300"}


@dataclass
class Result:
    scenario: str
    target: str  # service | limit | own-sql | floor
    concurrency: int
    tickets: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    non2xx: int
    pg_sessions_peak: int
    app_cpu_ms_per_request: float | None
    cpu_busy: float  # the machine's CPU use during the run, 0..1
    interpreter: str = "default"  # or the --python path the service ran on
    threads_peak: list[int] | None = None  # the most threads seen in each uvicorn worker
    grown_to: int = 0  # the history's size (--scale) when measured; 0: the seeded table
    # answers marked Idempotent-Replayed (the create scenarios' wrk runs; None: not counted)
    replayed: int | None = None
    round: int | None = None  # which of the --rounds of the headline runs; None: another run


# --- Database -------------------------------------------------------------------------------
class Database:
    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.url = cluster.url(DB)

    def connect(self, **kwargs) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True, application_name="bench", **kwargs)

    def execute(self, sql: str, params=None) -> list:
        with self.connect() as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def scalar(self, sql: str, params=None):
        return self.execute(sql, params)[0][0]


def setup_database(cluster: Cluster, env: dict) -> Database:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {DB}")
    db = Database(cluster)
    run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], env=env)
    return db


def seed(db: Database, agents: int) -> dict:
    """The admin and ``agents`` agents, each with a token whose key is its id zero-padded to 40
    digits (SHA-256 stored, as for any token); returns their ids."""
    with db.connect() as conn:
        admin = conn.execute(
            "INSERT INTO auth_user (password, is_superuser, username, first_name, last_name,"
            " email, is_staff, is_active, date_joined)"
            " VALUES ('!', true, 'bench-admin', '', '', '', true, true, now()) RETURNING id"
        ).fetchone()[0]
        first = conn.execute(
            "INSERT INTO auth_user (password, is_superuser, username, first_name, last_name,"
            " email, is_staff, is_active, date_joined)"
            " SELECT '!', false, format('bench-agent-%%s', g), '', '', '', false, true, now()"
            " FROM generate_series(1, %s) g RETURNING id",
            (agents,),
        ).fetchall()[0][0]
        conn.execute(
            "INSERT INTO auth_user_groups (user_id, group_id)"
            " SELECT u.id, g.id FROM auth_user u, auth_group g"
            " WHERE u.username LIKE 'bench-agent-%%' AND g.name = 'agents'"
        )
        conn.execute(
            "INSERT INTO support_apitoken (key_hash, user_id, created_at, expires_at)"
            " SELECT encode(sha256(convert_to(lpad(id::text, 40, '0'), 'UTF8')), 'hex'), id,"
            " now(), now() + interval '30 days' FROM auth_user WHERE username LIKE 'bench-%%'"
        )
    return {"admin": admin, "first_agent": first, "agents": agents}


def refill_pool(db: Database, users: dict, open_target: int) -> None:
    """Exactly ``open_target`` open tickets again: churn and the top-ups consume them, ticket
    creation adds to them (the newest surplus is deleted with its events)."""
    db.execute(
        "WITH surplus AS (DELETE FROM support_ticket WHERE id IN (SELECT id FROM support_ticket"
        " WHERE status = 'open' ORDER BY id DESC LIMIT greatest(0, (SELECT count(*)"
        " FROM support_ticket WHERE status = 'open') - %s)) RETURNING id),"
        " history AS (DELETE FROM support_ticketassignment"
        "  WHERE ticket_id IN (SELECT id FROM surplus))"
        " DELETE FROM support_ticketevent WHERE ticket_id IN (SELECT id FROM surplus)",
        (open_target,),
    )
    # the f-string below adds SQL made of constants (_ticket_text); the values are parameters
    db.execute(
        "INSERT INTO support_ticket (title, description, status, priority, created_at,"  # noqa: S608
        " updated_at, created_by_id)"
        f" SELECT {_ticket_text('g')},"
        " 'open', (g * 7) %% 4, now() - (g || ' seconds')::interval, now(), %(admin)s"
        " FROM generate_series(1, greatest(0, %(target)s - (SELECT count(*) FROM support_ticket"
        " WHERE status = 'open'))) g",
        {"admin": users["admin"], "target": open_target, **VOCABULARY},
    )


def _ticket_text(g: str) -> str:
    """SQL for a seeded ticket's title and description from the row number ``g``: e.g.
    'VPN keeps disconnecting' and 'Reported from the Oslo office since Monday. Error code
    E217.' Each error code is in one ticket of 250 (37 is prime to 250), the title's subject
    and problem cycle through their 208 pairs. Needs the VOCABULARY parameters."""

    def pick(name: str, index: str) -> str:
        return f"(%({name})s::text[])[1 + ({index}) %% {len(VOCABULARY[name])}]"

    return (
        f"{pick('subjects', g)} || ' ' || {pick('problems', f'{g} / {len(SUBJECTS)}')},"
        f" format('Reported from the %%s office %%s. Error code E%%s.', {pick('places', g)},"
        f" {pick('when', f'{g} / 3')}, 100 + ({g} * 37) %% {ERROR_CODES})"
    )


def grow_history(db: Database, users: dict, total: int, history_agents: int) -> None:
    """Closed tickets (each with its agent, as on every ticket that is not open, its
    assignment and events) until the table holds ``total`` tickets, spread over the first
    ``history_agents`` agents: a long-lived install."""
    missing = total - db.scalar("SELECT count(*) FROM support_ticket")
    if missing <= 0:
        return
    started = time.monotonic()
    with db.connect() as conn:
        conn.execute("SET maintenance_work_mem = '256MB'")
        conn.execute(
            "CREATE TEMP TABLE new_closed AS"  # noqa: S608 (constants only, as in refill_pool)
            " WITH t AS (INSERT INTO support_ticket (title, description, status, priority,"
            "  created_at, updated_at, created_by_id, assigned_to_id, assigned_at)"
            f"  SELECT {_ticket_text('g')}, 'closed', g %% 4,"
            "   created, now() - interval '300 days', %(admin)s,"
            "   %(first_agent)s + (g %% %(agents)s)::int, created + interval '1 hour'"
            "  FROM (SELECT g, now() - interval '400 days' + (g || ' seconds')::interval"
            "   AS created FROM generate_series(1, %(missing)s) g) s"
            "  RETURNING id, created_at, assigned_to_id, assigned_at)"
            " SELECT id, created_at, assigned_to_id AS agent, assigned_at FROM t",
            {
                "admin": users["admin"],
                "first_agent": users["first_agent"],
                "agents": history_agents,
                "missing": missing,
                **VOCABULARY,
            },
        )
        conn.execute(
            "INSERT INTO support_ticketassignment (ticket_id, agent_id, assigned_at, is_active)"
            " SELECT id, agent, assigned_at, true FROM new_closed"
        )
        conn.execute(
            "INSERT INTO support_ticketevent (ticket_id, at, actor_id, kind, from_status,"
            " to_status, agent_id, changes)"
            " SELECT id, created_at, %s, 'created', '', 'open', NULL, '{}'::jsonb FROM new_closed"
            " UNION ALL SELECT id, created_at + interval '1 hour', agent, 'assigned', 'open',"
            "  'assigned', agent, '{}'::jsonb FROM new_closed"
            " UNION ALL SELECT id, created_at + interval '2 hours', agent, 'status_changed',"
            "  'assigned', 'resolved', agent, '{}'::jsonb FROM new_closed"
            " UNION ALL SELECT id, created_at + interval '3 hours', agent, 'status_changed',"
            "  'resolved', 'closed', agent, '{}'::jsonb FROM new_closed",
            (users["admin"],),
        )
        conn.execute("ANALYZE")
    log(f"history grown by {missing} closed tickets in {time.monotonic() - started:.0f} s")


# --- The service ----------------------------------------------------------------------------
def top_up_agents(server: Server, users: dict, count: int) -> None:
    """One fetch per agent, so each holds the cap before a run (poll's precondition)."""
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        for uid in range(users["first_agent"], users["first_agent"] + count):
            response = client.get("/api/agent/tickets/", headers={"Authorization": token(uid)})
            response.raise_for_status()


def token(uid: int) -> str:
    return f"Token {uid:040d}"


# --- Measuring ------------------------------------------------------------------------------
class Sampler:
    """Peak client sessions on the benchmark database, the most threads in each of
    ``workers`` (processes), and the machine's CPU use."""

    def __init__(self, db: Database, workers: list[int] = ()):
        self.db = db
        self.peak = 0
        self.threads = dict.fromkeys(workers, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with self.db.connect() as conn:
            while not self._stop.wait(0.05):
                for pid, peak in self.threads.items():
                    self.threads[pid] = max(peak, thread_count(pid))
                count = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                    " AND backend_type = 'client backend' AND application_name <> 'bench'",
                    (DB,),
                ).fetchone()[0]
                self.peak = max(self.peak, count)
                conn.execute("SELECT pg_stat_clear_snapshot()")

    def __enter__(self):
        self._cpu = cpu_times()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        busy, total = (a - b for a, b in zip(cpu_times(), self._cpu, strict=True))
        self.cpu_busy = busy / total if total else 0.0


def thread_count(pid: int) -> int:
    """The process's threads now (``Threads:`` in /proc/PID/status); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def process_cpu(pids: list[int]) -> float:
    """User + system CPU seconds of these processes."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def wrk(server: Server, scenario: str, concurrency: int, duration: float, env: dict) -> dict:
    if scenario in LISTS:
        env = {**env, "BENCH_QUERY": LISTS[scenario]}
    if scenario in KEYS:
        env = {**env, "BENCH_KEYS": KEYS[scenario], "BENCH_RUN": str(next(RUN_IDS))}
    command = [
        "wrk",
        "-t",
        str(concurrency),
        "-c",
        str(concurrency),
        "-d",
        f"{round(duration)}s",
        "--timeout",
        "30s",
        "-s",
        str(BENCH / "lua" / f"{LUA[scenario]}.lua"),
        server.base_url,
    ]
    out = run(command, env={**os.environ, **env}, capture=True)
    figures = json.loads(out.strip().splitlines()[-1])
    seconds = figures["duration_us"] / 1e6
    return {
        "requests": figures["requests"],
        "rps": figures["requests"] / seconds,
        "p50_ms": figures["p50_us"] / 1000,
        "p90_ms": figures["p90_us"] / 1000,
        "p99_ms": figures["p99_us"] / 1000,
        "non2xx": figures["non2xx"] + figures["socket_errors"],
        **({"replayed": figures["replayed"]} if "replayed" in figures else {}),
    }


def pgbench(db: Database, script: str, concurrency: int, duration: float, users: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-pgbench-") as tmp:
        path = Path(tmp) / "script.sql"
        path.write_text(script)
        command = [
            _find_bin("pgbench"),
            "-n",
            "-M",
            "prepared",
            "-c",
            str(concurrency),
            "-j",
            str(min(concurrency, 2)),
            "-T",
            str(int(duration)),
            "-D",
            f"first_agent={users['first_agent']}",
            "-D",
            f"admin_id={users['admin']}",
            "-D",
            "phase=0",
            "-D",
            "id=0",
            "-D",
            "ticket_id=0",
            "-D",
            "key_no=0",  # the keyed creates' key number (bench/sql/keyed_create.sql)
            "-D",
            f"run={next(RUN_IDS)}",
            "-l",
            "--log-prefix",
            f"{tmp}/log",
            "-f",
            str(path),
            "-h",
            "127.0.0.1",
            "-p",
            str(db.cluster.port),
            "-U",
            db.cluster.user,
            DB,
        ]
        env = {**os.environ, "PGPASSWORD": db.cluster.password, "PGAPPNAME": "pgbench"}
        proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if proc.returncode not in (0, 2) or "tps = " not in proc.stdout:
            raise RuntimeError(f"pgbench failed:\n{proc.stdout}\n{proc.stderr}\n{script}")
        latencies = []
        for log_file in Path(tmp).glob("log*"):
            for line in log_file.read_text().splitlines():
                latencies.append(int(line.split()[2]))
    failed = len(re.findall(r"client \d+ aborted", proc.stderr))
    failed += (
        int(m.group(1))
        if (m := re.search(r"number of failed transactions: (\d+)", proc.stdout))
        else 0
    )
    if failed:
        log(f"pgbench: {failed} failures\n{proc.stderr[-2000:]}")
    tps = float(re.search(r"tps = ([\d.]+)", proc.stdout).group(1))
    latencies.sort()
    return {
        "requests": len(latencies),
        "rps": tps,
        "p50_ms": percentile(latencies, 50) / 1000,
        "p90_ms": percentile(latencies, 90) / 1000,
        "p99_ms": percentile(latencies, 99) / 1000,
        "non2xx": failed,
    }


def percentile(sorted_values: list[int], pct: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, round(pct / 100 * (len(sorted_values) - 1)))
    return float(sorted_values[index])


def expand(script: str) -> str:
    """pgbench has no include: ``\\include name`` lines are replaced by bench/sql/<name>."""
    return re.sub(
        r"^\\include (\S+)$",
        lambda m: (BENCH / "sql" / m.group(1)).read_text().strip(),
        script,
        flags=re.M,
    )


# --- The run --------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.args = args
        self.results: list[Result] = []
        self.profiles: dict[str, dict] = {}
        self.interpreters: dict[str, dict] = {}
        self.search_matches: list[dict] = []
        self.statements: dict[str, int] = {}
        self.grown_to = 0
        self.round: int | None = None  # of the headline runs (--rounds); None: other runs

    def measure(self, scenario, target, concurrency, runner, server, python="default") -> Result:
        db, users = self.db, self.users
        refill_pool(db, users, self.args.open_tickets)
        if scenario == "churn" or scenario == "poll":
            top_up_agents(server, users, max(concurrency, self.args.agents))
        # every run starts from tables autovacuum has just caught up with, so that a vacuum
        # running in the middle of one run and not of the other does not decide a ratio
        db.execute(
            "VACUUM ANALYZE support_ticket, support_ticketassignment, support_idempotency_key"
        )
        tickets = db.scalar("SELECT count(*) FROM support_ticket")
        # the uvicorn processes: the supervisor and all it started
        served = target in ("service", "floor")
        app = [server.pid, *children(server.pid)] if served else None
        workers = (server.worker_pids() or [server.pid]) if served else []
        before = process_cpu(app) if app else None
        with Sampler(db, workers) as sampler:
            figures = runner()
        app_cpu = None
        if app and figures["requests"]:
            app_cpu = (process_cpu(app) - before) * 1000 / figures["requests"]
        result = Result(
            scenario=scenario,
            target=target,
            concurrency=concurrency,
            tickets=tickets,
            pg_sessions_peak=sampler.peak,
            app_cpu_ms_per_request=app_cpu,
            cpu_busy=sampler.cpu_busy,
            interpreter=python,
            threads_peak=[sampler.threads[pid] for pid in workers] or None,
            grown_to=self.grown_to,
            round=self.round,
            **figures,
        )
        self.results.append(result)
        log(
            f"{scenario:19} {target:7} c={concurrency:<3} tickets={tickets:<8}"
            f" {result.rps:8.0f} req/s  p50 {result.p50_ms:6.2f}  p99 {result.p99_ms:7.2f} ms"
            f"  non-2xx {result.non2xx}  pg sessions {result.pg_sessions_peak}"
            + (f"  app cpu {app_cpu:.2f} ms/req" if app_cpu is not None else "")
            + (f"  threads {result.threads_peak}" if result.threads_peak else "")
            + (f"  replayed {result.replayed}" if result.replayed is not None else "")
            + (f"  [{python}]" if python != "default" else "")
            + (
                f"  round {self.round + 1}"
                if self.round is not None and self.args.rounds > 1
                else ""
            )
        )
        return result

    def service(self, server, scenario, concurrency, python="default"):
        env = {
            "BENCH_FIRST_AGENT": str(self.users["first_agent"]),
            "BENCH_ADMIN_ID": str(self.users["admin"]),
        }
        if self.args.warmup:
            wrk(server, scenario, concurrency, self.args.warmup, env)
        return self.measure(
            scenario,
            "floor" if scenario in FLOORS.values() else "service",
            concurrency,
            lambda: wrk(server, scenario, concurrency, self.args.duration, env),
            server,
            python,
        )

    def floors(self, service: Server, python: str, label: str) -> None:
        """Every floor at each concurrency, on ``python``: the service's own /bench/floor/
        (``service`` serves it), then the bare Django project (default and pooled handler) and
        the bare ASGI app, each under uvicorn as the service is; all started at once so that
        the runs of one concurrency follow each other."""
        with ExitStack() as stack:
            servers = {"service": service}
            for name in self.args.floors:
                if name != "service":
                    servers[name] = stack.enter_context(
                        floors.serve(
                            name,
                            workers=self.args.workers,
                            python=python,
                            # the service's default: as many request threads as connections
                            env={"SUPPORT_REQUEST_THREADS": str(self.args.pool_size)},
                        )
                    )
            for concurrency in self.args.concurrency:
                for name in self.args.floors:
                    self.service(servers[name], FLOORS[name], concurrency, label)

    def other_interpreter(self, label: str, python: str, env: dict) -> None:
        """The headline runs (floors, then each scenario at each concurrency; no ceilings,
        sweep or scale) on another interpreter, against the same database."""
        with run_uvicorn(workers=self.args.workers, env=env, python=python) as server:
            top_up_agents(server, self.users, self.args.agents)  # warms each worker up too
            self.floors(server, python, label)
            for scenario in self.args.scenarios:
                for concurrency in self.args.concurrency:
                    self.service(server, scenario, concurrency, label)

    def lists(self, server: Server) -> None:
        """The admin lists on the table as it is now (lists at scale)."""
        refill_pool(self.db, self.users, self.args.open_tickets)  # the table as measured
        matching = self.db.scalar(
            "SELECT count(*) FROM support_ticket"
            " WHERE title ILIKE %(t)s OR description ILIKE %(t)s",
            {"t": f"%{SEARCH_TERM}%"},
        )
        tickets = self.db.scalar("SELECT count(*) FROM support_ticket")
        self.search_matches.append(
            {"grown_to": self.grown_to, "tickets": tickets, "matching": matching}
        )
        log(f"search {SEARCH_TERM!r} matches {matching} of {tickets} tickets")
        for scenario in LISTS:
            for concurrency in self.args.list_concurrency:
                self.service(server, scenario, concurrency)

    def ceiling(self, server, scenario, concurrency, target):
        script = self.limit[scenario] if target == "limit" else self.own[scenario]
        if scenario in ("poll", "churn"):
            script = "\\set agent_id :first_agent + :client_id\n" + script
        return self.measure(
            scenario,
            target,
            concurrency,
            lambda: pgbench(self.db, script, concurrency, self.args.duration, self.users),
            server,
        )

    def profile(self, server, scenario, concurrency, seconds) -> None:
        """py-spy on one worker during an extra run (not one of the measured ones)."""
        from concurrent.futures import ThreadPoolExecutor

        from bench import profile

        refill_pool(self.db, self.users, self.args.open_tickets)
        top_up_agents(server, self.users, max(concurrency, self.args.agents))
        env = {
            "BENCH_FIRST_AGENT": str(self.users["first_agent"]),
            "BENCH_ADMIN_ID": str(self.users["admin"]),
        }
        worker = server.worker_pids()[0]
        with ThreadPoolExecutor(1) as pool:
            load = pool.submit(wrk, server, scenario, concurrency, seconds + 3, env)
            time.sleep(1.5)
            top = profile.record(worker, seconds)
            figures = load.result()
        self.profiles[scenario] = {
            "concurrency": concurrency,
            "seconds": seconds,
            "rps_while_sampled": round(figures["rps"]),
            "top": top,
        }
        log(
            f"profiled {scenario}: "
            + "; ".join(f"{row['share']:.0%} {row['function']}" for row in top[:6])
        )

    def main(self) -> None:
        args = self.args
        started = time.monotonic()
        # before anything long: the interpreters, and a venv for each other one
        self.interpreters["default"] = interpreter.describe(sys.executable)
        others = {}
        for python in args.python:
            others[python] = interpreter.ensure_venv(python, log=log)
            self.interpreters[python] = interpreter.describe(others[python])
        for label, info in self.interpreters.items():
            where = f"{info['base_executable']} {info['version']}"
            log(f"interpreter {label}: {where}, {info['build']}")
        cluster = start_cluster(PG_SETTINGS)
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "project.settings",
            "DJANGO_DEBUG": "0",
            "DJANGO_SECRET_KEY": "benchmark-only-" + "k" * 40,
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,testserver",
            "DJANGO_SECURE_SSL_REDIRECT": "0",
            "DATABASE_URL": cluster.url(DB),
            "DB_POOL_MIN_SIZE": "1",
            "DB_POOL_MAX_SIZE": str(args.pool_size),
            "LOG_LEVEL": args.log_level,
            "SUPPORT_BENCH_ENDPOINTS": "1",
            "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="bench-metrics-"),
        }
        self.db = setup_database(cluster, env)
        agents = max([args.agents, *args.sweep])
        self.users = seed(self.db, agents)
        refill_pool(self.db, self.users, args.open_tickets)
        self.db.execute("VACUUM ANALYZE")
        log(f"seeded {agents} agents, {args.open_tickets} open tickets")
        captured = json.loads(run([sys.executable, "-m", "bench.capture"], env=env, capture=True))
        self.statements = captured["statements"]
        log(f"statements per request: {self.statements}")
        self.limit = {
            name: expand((BENCH / "sql" / f"{name.replace('-', '_')}.sql").read_text())
            for name in SCENARIOS
        }
        self.own = {k: expand(v) for k, v in captured["scripts"].items()}
        self.pg_version = self.db.scalar("SHOW server_version")

        with run_uvicorn(workers=args.workers, env=env) as server:
            top_up_agents(server, self.users, agents)
            self.floors(server, sys.executable, "default")
            # each round measures every scenario once, so that a spell of load from outside
            # (a machine shared with other work) falls on all of them, not on one
            for self.round in range(args.rounds):
                for scenario in args.scenarios:
                    for concurrency in args.concurrency:
                        self.service(server, scenario, concurrency)
                        self.ceiling(server, scenario, concurrency, "limit")
                        self.ceiling(server, scenario, concurrency, "own-sql")
            self.round = None
            for scenario in ("poll", "churn"):
                if scenario not in args.scenarios:
                    continue
                for concurrency in args.sweep:
                    if concurrency in args.concurrency:
                        continue
                    self.service(server, scenario, concurrency)
                    self.ceiling(server, scenario, concurrency, "limit")
            if args.profile:
                for scenario in ("poll", "churn"):
                    try:
                        self.profile(server, scenario, 16, args.profile)
                    except Exception as exc:  # a profile is a note, not a measurement
                        log(f"profiling {scenario} failed: {exc!r}")
        # one server at a time: an idle one would count in the next one's PG sessions
        for label, python in others.items():
            self.other_interpreter(label, python, env)
        if args.scale:
            with run_uvicorn(workers=args.workers, env=env) as server:
                top_up_agents(server, self.users, agents)
                self.lists(server)  # the lists' figures at the seeded size, to compare with
                for total in args.scale:
                    grow_history(self.db, self.users, total, args.agents)
                    self.grown_to = total
                    for scenario in ("poll", "churn"):
                        for concurrency in args.concurrency:
                            self.service(server, scenario, concurrency)
                            self.ceiling(server, scenario, concurrency, "limit")
                    self.lists(server)
        self.elapsed = time.monotonic() - started
        cluster.stop()

    def report(self) -> dict:
        return {
            "machine": machine(),
            "commit": git("rev-parse", "--short", "HEAD")
            + ("+dirty" if git("status", "--porcelain") else ""),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "settings": {
                "workers": self.args.workers,
                "pool_size_per_worker": self.args.pool_size,
                "duration_s": self.args.duration,
                "warmup_s": self.args.warmup,
                "agents": self.args.agents,
                "open_tickets": self.args.open_tickets,
                "postgresql": self.pg_version,
                "postgresql_settings": "defaults, max_connections=300",
                "log_level": self.args.log_level,
                "floors": self.args.floors,
                "list_concurrency": self.args.list_concurrency,
                "rounds": self.args.rounds,
            },
            "elapsed_s": round(self.elapsed),
            "interpreters": self.interpreters,
            "search": {"term": SEARCH_TERM, "matches": self.search_matches},
            "statements": self.statements,
            "results": [asdict(r) for r in self.results],
            "profiles": self.profiles,
        }


def machine() -> dict:
    model = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def git(*args) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()


def run(command, env=None, capture=False) -> str:
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{command[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout if capture else ""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv=None):
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=10, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=2, help="seconds before each service run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pool-size", type=int, default=10, help="DB_POOL_MAX_SIZE per worker")
    parser.add_argument("--agents", type=int, default=64)
    parser.add_argument("--open-tickets", type=int, default=20_000)
    parser.add_argument("--concurrency", type=ints, default=[16, 64])
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure the scenarios (each against both ceilings) this many times, one round "
        "after the other; the report shows the round with the median req/s",
    )
    parser.add_argument("--sweep", type=ints, default=None, help="default 1,4,16,64,256")
    parser.add_argument("--scale", type=ints, default=None, help="default 200000,1000000")
    parser.add_argument(
        "--scenarios",
        type=lambda t: [x for x in t.split(",") if x],
        default=list(SCENARIOS),
        help=f"of {','.join(SCENARIOS)} (the floors always run: --floors; 'floor' adds nothing)",
    )
    parser.add_argument(
        "--floors",
        type=lambda t: [x for x in t.split(",") if x],
        default=list(FLOORS),
        help=f"which floors to measure, of {','.join(FLOORS)}",
    )
    parser.add_argument(
        "--list-concurrency",
        type=ints,
        default=[16],
        help="connections for the admin lists as history grows (--scale)",
    )
    parser.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="PATH",
        help="also run the floors and the scenarios (no ceilings, sweep or scale) with the "
        "service on this interpreter, in a venv of its own (.venv-bench-*); repeatable",
    )
    parser.add_argument("--log-level", default="INFO", help="the service's LOG_LEVEL")
    parser.add_argument(
        "--profile",
        type=float,
        default=None,
        help="seconds of py-spy on one worker for poll and churn (0: none)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.json")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 2 s per run, no warm-up, no sweep, no scale (unless given)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    if unknown := set(args.floors) - set(FLOORS):
        parser.error(f"unknown floors: {', '.join(sorted(unknown))}")
    if unknown := set(args.scenarios) - set(SCENARIOS) - {"floor"}:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    args.scenarios = [s for s in args.scenarios if s in SCENARIOS]
    if args.quick:
        args.duration, args.warmup = 2, 0
    if args.sweep is None:
        args.sweep = [] if args.quick else [1, 4, 16, 64, 256]
    if args.scale is None:
        args.scale = [] if args.quick else [200_000, 1_000_000]
    if args.profile is None:
        args.profile = 0 if args.quick else 10
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    bench = Bench(args)
    bench.main()
    data = bench.report()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    log(f"wrote {args.out} ({data['elapsed_s']} s)")
    from bench import report

    report.write(data, args.out)


if __name__ == "__main__":
    main()
