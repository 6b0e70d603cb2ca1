"""How long the service takes to serve again after database faults, worst of N repeats.

    python -m bench.recovery                  # 20 repeats of each scenario
    python -m bench.recovery --repeats 5 --scenario kills

Each repeat: a throwaway PostgreSQL (durable, as installed), the service with the default pool
settings (DB_POOL_MIN_SIZE 1, DB_POOL_MAX_SIZE 10, DB_POOL_TIMEOUT 5) and two workers, six
clients creating, listing and fetching tickets every 50 ms, and one fault:

- ``restart``: PostgreSQL stopped (fast) and started again after 1.5 s, under that load, then
  once more while no request runs, followed by a burst;
- ``kills``: every app connection terminated (``pg_terminate_backend``) six times, 0.5 s apart.

Recovery is measured from the moment the database is reachable again (the restart's start
returned; the last kill was sent) to the end of the last failed request that ended after it
(0 when none did): from then on, every request succeeded. Also reported: when the requests
that were waiting through the fault had all been answered, failures of requests that started
after that moment (should be none), and the slowest failed request.
"""

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.pg_cluster import start_cluster  # noqa: E402
from tests.servers import run_uvicorn  # noqa: E402

DB = "recovery"
POOL = {"DB_POOL_MIN_SIZE": "1", "DB_POOL_MAX_SIZE": "10", "DB_POOL_TIMEOUT": "5"}
KILL = """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE application_name = 'support-tickets' AND datname = current_database()"""


def prepare(cluster) -> tuple[str, list[str]]:
    """Schema, an admin with a token, an agent with a token, 2,000 open tickets."""
    url = cluster.url(DB)
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {DB}")
    env = {**os.environ, "DATABASE_URL": url, "DJANGO_SECRET_KEY": "r" * 50}
    env["DJANGO_SETTINGS_MODULE"] = "project.settings"
    subprocess.run(
        [sys.executable, "-m", "django", "migrate", "-v0"], env=env, check=True, cwd=ROOT
    )
    script = """
from support import services
from support.models import Ticket
from support.tokens import token_issue
admin = services.User.objects.create_user(username="admin", password="x", is_staff=True)
agent = services.User.objects.create_user(username="agent", password="x")
agent.groups.add(services.agents_group())
Ticket.objects.bulk_create(Ticket(title=f"t{n}", created_by=admin) for n in range(2000))
print(token_issue(user_id=admin.pk), token_issue(user_id=agent.pk))
"""
    done = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", script],
        env=env,
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return url, done.stdout.splitlines()[-1].split()


async def load(base: str, tokens: list[str], until: float, calls: list) -> None:
    admin, agent = ({"Authorization": f"Token {t}"} for t in tokens)

    async def one(kind: str):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            while time.time() < until:
                start = time.time()
                try:
                    if kind == "create":
                        r = await client.post("/api/tickets/", json={"title": "t"}, headers=admin)
                    elif kind == "list":
                        r = await client.get("/api/tickets/?page_size=5", headers=admin)
                    else:
                        r = await client.get("/api/agent/tickets/", headers=agent)
                    status = r.status_code
                except httpx.HTTPError:
                    status = None
                calls.append((start, time.time(), status))
                await asyncio.sleep(0.05)

    await asyncio.gather(*(one(k) for k in ("create", "create", "list", "list", "fetch", "fetch")))


def measure(calls: list, back: float) -> dict:
    failed = [c for c in calls if c[2] not in (200, 201)]
    late = [c for c in failed if c[1] > back]
    waited = [c for c in calls if c[0] < back < c[1] and c[2] in (200, 201)]
    return {
        "recovery": max((c[1] - back for c in late), default=0.0),
        # requests held through the outage and served after it: when the last one was
        "held_served": max((c[1] - back for c in waited), default=0.0),
        "failed_after": sum(c[0] > back for c in failed),
        "slowest_failure": max((c[1] - c[0] for c in failed), default=0.0),
        "requests": len(calls),
        "failed": len(failed),
    }


def restart(cluster, base: str, tokens: list[str]) -> list[dict]:
    calls: list = []
    up: list[float] = []

    def outage():
        time.sleep(2.0)
        cluster.stop("fast")
        time.sleep(1.5)
        cluster.start()
        up.append(time.time())

    async def under_load():
        until = time.time() + 9.0
        await asyncio.gather(load(base, tokens, until, calls), asyncio.to_thread(outage))

    asyncio.run(under_load())
    loaded = measure(calls, up[0])
    # again while idle, then a burst: every pooled connection is dead, none noticed yet
    cluster.stop("fast")
    time.sleep(1.5)
    cluster.start()
    back = time.time()
    idle: list = []
    asyncio.run(load(base, tokens, time.time() + 2.0, idle))
    return [loaded, measure(idle, back)]


def kills(cluster, base: str, tokens: list[str]) -> list[dict]:
    calls: list = []
    last: list[float] = []

    def six():
        time.sleep(2.0)
        with psycopg.connect(cluster.url(DB), autocommit=True) as conn:
            for _ in range(6):
                conn.execute(KILL)
                last[:] = [time.time()]
                time.sleep(0.5)

    async def under_load():
        until = time.time() + 9.0
        await asyncio.gather(load(base, tokens, until, calls), asyncio.to_thread(six))

    asyncio.run(under_load())
    return [measure(calls, last[0])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--scenario", choices=("restart", "kills"), action="append")
    args = parser.parse_args()
    for scenario in args.scenario or ["restart", "kills"]:
        runs = []
        for n in range(args.repeats):
            cluster = start_cluster(settings={"max_connections": "100"})
            try:
                url, tokens = prepare(cluster)
                env = {"DATABASE_URL": url, **POOL}
                with run_uvicorn(workers=2, env=env) as server:
                    fault = restart if scenario == "restart" else kills
                    results = fault(cluster, server.base_url, tokens)
            finally:
                cluster.stop("immediate")
            runs.append(results)
            figures = "; ".join(
                f"recovery {r['recovery']:.2f}s, held requests served by "
                f"{r['held_served']:.2f}s, {r['failed']}/{r['requests']} failed, "
                f"{r['failed_after']} after, slowest failure {r['slowest_failure']:.2f}s"
                for r in results
            )
            print(f"{scenario} #{n + 1}: {figures}", flush=True)
        for part in range(len(runs[0])):
            name = scenario + (" (idle, then a burst)" if part else "")
            recoveries = [r[part]["recovery"] for r in runs]
            after = sum(r[part]["failed_after"] for r in runs)
            slowest = max(r[part]["slowest_failure"] for r in runs)
            held = max(r[part]["held_served"] for r in runs)
            print(
                f"== {name}: {len(runs)} repeats; recovery worst {max(recoveries):.2f}s, "
                f"median {statistics.median(recoveries):.2f}s; requests held through the "
                f"fault all served by {held:.2f}s after it; failures of requests started "
                f"after the database was back: {after}; slowest failed request {slowest:.2f}s"
            )


if __name__ == "__main__":
    main()
