"""The live event feed under load: 500 subscribers, 10,000 events, a worker killed midway.

    python -m bench.events                     # 500 subscribers, 10,000 events
    python -m bench.events --subscribers 100 --events 2000 --out /tmp/events.json   # short

A throwaway PostgreSQL (durable, as installed), an admin and ``--drivers`` agents with tokens,
the service on two uvicorn workers. ``--subscribers`` streams (``GET /api/events/`` with
``Accept: text/event-stream``; a tenth of them admins, the rest the working agents, several
streams each) open first, each
recording the id of every event it receives and when. Then drivers make tickets' lives
through the API until ``--events`` events exist: the admin creates tickets, each agent fetches
(up to the cap), resolves and closes what it holds. Midway one worker is killed (SIGKILL; the
server starts another): its streams break, and each reconnects with ``Last-Event-ID`` as a
browser's EventSource does, to whichever worker takes it.

Checked for every subscriber, against the same feed read as JSON pages once all is quiet: each
of its events received exactly once and in id order. Reported: delivery latency (receipt time
minus the event's ``at``, written just before its transaction commits) p50/p99, reconnections,
and the events per second written.
"""

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import PG_SETTINGS, machine, percentile, seed, setup_database, token  # noqa: E402
from bench.waiters import Connection, service_env, write  # noqa: E402
from tests.pg_cluster import start_cluster  # noqa: E402
from tests.servers import run_uvicorn  # noqa: E402


def log(message: str) -> None:
    print(f"[events {time.strftime('%H:%M:%S')}] {message}", flush=True)


def epoch(at: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()


class Subscriber:
    """One stream, reconnecting after ``Last-Event-ID`` whenever it breaks."""

    def __init__(self, n: int, auth: str, port: int):
        self.n, self.auth, self.port = n, auth, port
        self.ids: list[int] = []
        self.latency_ms: list[float] = []
        self.connects = 0
        self.ready = asyncio.Event()

    async def run(self, start_after: int) -> None:
        last = start_after
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.2)
                continue
            self.connects += 1
            writer.write(
                (
                    f"GET /api/events/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Authorization: {self.auth}\r\nAccept: text/event-stream\r\n"
                    f"Last-Event-ID: {last}\r\n\r\n"
                ).encode()
            )
            try:
                await writer.drain()
                status = (await reader.readline()).split()
                if len(status) < 2 or status[1] != b"200":
                    raise ConnectionError(f"stream answered {status}")
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                self.ready.set()
                event_id, data = None, None
                async for raw in _chunked_lines(reader):
                    if raw.startswith("id:"):
                        event_id = int(raw[3:].strip())
                    elif raw.startswith("data:"):
                        data = raw[5:].strip()
                    elif raw == "" and event_id is not None:
                        if data is not None:  # else a position only (a ping, the start)
                            self.ids.append(event_id)
                            at = epoch(json.loads(data)["at"])
                            self.latency_ms.append((time.time() - at) * 1000)
                        last, event_id, data = event_id, None, None
            except (ConnectionError, OSError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
            await asyncio.sleep(random.uniform(0.05, 0.3))  # noqa: S311 (EventSource's retry)


async def _chunked_lines(reader: asyncio.StreamReader):
    """The lines of a chunked HTTP body, as text (uvicorn sends a stream chunked)."""
    pending = ""
    while True:
        size_line = await reader.readline()
        if not size_line:
            raise ConnectionError("stream closed")
        size = int(size_line.strip() or b"0", 16)
        if size == 0:
            raise ConnectionError("stream ended")
        chunk = await reader.readexactly(size + 2)
        pending += chunk[:-2].decode()
        *lines, pending = pending.split("\n")
        for line in lines:
            yield line


async def drive(port: int, admin: str, agents: list[str], target: int, count_events) -> None:
    """Tickets' lives through the API until ``count_events()`` reaches ``target``; a driver
    whose connection breaks (its worker killed) opens another."""

    async def loop(step):
        conn = await Connection.open(port)
        while count_events() < target:
            try:
                await step(conn)
            except (ConnectionError, OSError, asyncio.IncompleteReadError):
                conn.close()
                await asyncio.sleep(0.1)
                conn = await Connection.open(port)
        conn.close()

    async def create(conn):
        body = json.dumps({"title": "bench event"}).encode()
        status, _ = await conn.request("POST", "/api/tickets/", admin, body)
        if status != 201:
            await asyncio.sleep(0.05)

    def work(auth: str):
        async def step(conn):
            status, held = await conn.request("GET", "/api/agent/tickets/", auth)
            if status != 200 or not held:
                await asyncio.sleep(0.05)
                return
            for ticket in held:
                for move in ("resolved", "closed"):
                    body = json.dumps({"ticket_id": ticket["id"], "status": move}).encode()
                    await conn.request("POST", "/api/agent/tickets/", auth, body)

        return step

    await asyncio.gather(loop(create), loop(create), *(loop(work(a)) for a in agents))


async def oracle(base_url: str, auth: str, after: int) -> list[int]:
    """The subscriber's events after ``after``, read as JSON pages (the feed's own rule)."""
    ids = []
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        while True:
            r = await client.get(
                "/api/events/", params={"after": after, "limit": 1000},
                headers={"Authorization": auth},
            )  # fmt: skip
            r.raise_for_status()
            page = r.json()
            ids += [e["id"] for e in page["events"]]
            if not page["events"]:
                return ids
            after = page["next_after"]


async def main_async(args) -> dict:
    cluster = start_cluster(PG_SETTINGS)
    env = service_env(cluster, "events")
    db = setup_database(cluster, env)
    users = seed(db, args.drivers)
    agents = [token(users["first_agent"] + n) for n in range(args.drivers)]
    admin = token(users["admin"])
    start_after = db.scalar("SELECT COALESCE(max(id), 0) FROM support_ticketevent")
    with run_uvicorn(workers=2, env=env) as server:
        subscribers = [
            Subscriber(n, admin if n % 10 == 0 else agents[n % args.drivers], server.port)
            for n in range(args.subscribers)
        ]
        tasks = [asyncio.create_task(s.run(start_after)) for s in subscribers]
        await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in subscribers)), 60)
        log(f"{len(subscribers)} streams open")

        def count_events() -> int:
            return db.scalar("SELECT count(*) FROM support_ticketevent WHERE id > %s",
                             (start_after,))  # fmt: skip

        events_now = [0]

        async def counter():
            while True:
                events_now[0] = await asyncio.to_thread(count_events)
                await asyncio.sleep(0.2)

        counting = asyncio.create_task(counter())
        killed = {}

        async def killer():
            while events_now[0] < args.events // 2:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            victim = server.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            killed.update(pid=victim, at_events=events_now[0])
            log(f"killed worker {victim} at {events_now[0]} events")

        started = time.monotonic()
        await asyncio.gather(
            drive(server.port, admin, agents, args.events, lambda: events_now[0]),
            killer(),
        )
        written_in = time.monotonic() - started
        counting.cancel()
        total = count_events()
        log(f"{total} events written in {written_in:.1f} s; letting the streams catch up")
        last_id = db.scalar("SELECT max(id) FROM support_ticketevent")
        expected = {}
        for s in subscribers:
            if s.auth not in expected:
                expected[s.auth] = await oracle(server.base_url, s.auth, start_after)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(  # noqa: ASYNC110
            len(s.ids) < len(expected[s.auth]) for s in subscribers
        ):
            await asyncio.sleep(0.2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        workers_after = server.worker_pids()
    cluster.stop()

    exact = sum(1 for s in subscribers if s.ids == expected[s.auth])
    duplicates = sum(len(s.ids) - len(set(s.ids)) for s in subscribers)
    missing = sum(len(set(expected[s.auth]) - set(s.ids)) for s in subscribers)
    out_of_order = sum(1 for s in subscribers if s.ids != sorted(s.ids))
    latency = sorted(x for s in subscribers for x in s.latency_ms)
    return {
        "machine": machine(),
        "args": vars(args) | {"out": str(args.out)},
        "events_written": total,
        "last_event_id": last_id,
        "written_in_s": round(written_in, 1),
        "events_per_s": round(total / written_in, 1),
        "killed_worker": killed,
        "workers_after": len(workers_after),
        "subscribers": len(subscribers),
        "deliveries": len(latency),
        "subscribers_exact": exact,
        "duplicates": duplicates,
        "missing": missing,
        "out_of_order_subscribers": out_of_order,
        "reconnections": sum(s.connects - 1 for s in subscribers),
        "latency_ms": {
            "p50": round(percentile(latency, 50), 1) if latency else None,
            "p90": round(percentile(latency, 90), 1) if latency else None,
            "p99": round(percentile(latency, 99), 1) if latency else None,
            "max": round(latency[-1], 1) if latency else None,
        },
    }


def markdown(data: dict) -> str:
    lat = data["latency_ms"]
    rows = [
        ("subscribers (a tenth admins)", data["subscribers"]),
        ("events written", f"{data['events_written']} in {data['written_in_s']} s "
                           f"({data['events_per_s']}/s)"),
        ("worker killed (SIGKILL) at", f"{data['killed_worker'].get('at_events')} events"),
        ("reconnections (Last-Event-ID)", data["reconnections"]),
        ("events delivered", data["deliveries"]),
        ("subscribers with exactly their events, in order", f"{data['subscribers_exact']} of "
                                                             f"{data['subscribers']}"),
        ("duplicates / missing / out-of-order subscribers",
         f"{data['duplicates']} / {data['missing']} / {data['out_of_order_subscribers']}"),
        ("delivery latency p50 / p90 / p99 / max (ms)",
         f"{lat['p50']} / {lat['p90']} / {lat['p99']} / {lat['max']}"),
    ]  # fmt: skip
    return "\n".join(["| | |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=500)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument(
        "--drivers", type=int, default=40, help="agents doing the work, each with streams"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "events-bench.json")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    write(args.out, asyncio.run(main_async(args)), markdown)


if __name__ == "__main__":
    main()
