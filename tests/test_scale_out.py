"""The scale-out layout, end to end (README: Scale-out layout), with real processes.

On this session's throwaway PostgreSQL:

- an app role of its own, ``support_scale`` (table privileges only, as an app role that owns
  nothing would have), given the service's timeouts by the README's ``ALTER ROLE`` block;
- Debian's PgBouncer (1.18) running ``deploy/pgbouncer.ini`` as is (``tests/pgbouncer.py``
  replaces its ``[databases]`` entry, its paths and port, and takes a pool of ``POOL_SIZE``
  server connections), with the userlist the README's block makes;
- two ``python -m project.serve`` instances of two workers each, standing for two hosts, with
  the README's settings for a host: ``DATABASE_URL`` through PgBouncer, ``DB_POOLER=pgbouncer``,
  ``SUPPORT_LISTEN_DATABASE_URL`` straight to PostgreSQL;
- Debian's nginx with ``deploy/nginx-scale-out.conf`` (its two upstream servers are the two
  instances), plus a plain-HTTP server including the same snippet, as in
  tests/test_deploy_nginx.py.

The ``two_hosts`` fixture (module scope) yields a :class:`TwoHosts`: ``a`` and ``b`` (the
instances: ``.base_url``, ``.log()``, ``.worker_pids()``), ``nginx_url``, ``pgbouncer``
(``.console("SHOW POOLS")``), ``pgbouncer_dsn`` and ``direct_dsn`` (libpq strings for the app
role, through PgBouncer and straight to PostgreSQL) and ``client(where, token)`` for ``"a"``,
``"b"``, ``"nginx"`` or ``"nginx-tls"``. A test of what crosses hosts through the database
(a waiter on B, ``GET /api/agent/tickets/?wait=N``, woken by a ticket created through A; an
event-stream client on B seeing what A committed) starts from it::

    def test_a_waiter_on_b_is_woken_by_a_ticket_created_through_a(two_hosts):
        admin, agent = create_user(staff=True), create_user(agent=True)
        with two_hosts.client("b", agent.token, timeout=30) as b, two_hosts.client(
            "a", admin.token
        ) as a:
            ...
"""

import json
import os
import secrets
import shlex
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from django.db import connection
from psycopg import sql

import tests.settings as test_settings
from support.models import Ticket
from tests import servers
from tests.conftest import create_tickets, create_user
from tests.invariants import assert_invariants
from tests.pg_cluster import free_port
from tests.pgbouncer import PgBouncer, run_pgbouncer
from tests.servers import (
    ROOT,
    Server,
    fill,
    psycopg_conninfo,
    release_test_connections,
    run_uvicorn,
    self_signed_certificate,
    serve_process,
    stop_process,
    tcp_port_owner,
)

pytestmark = pytest.mark.django_db(transaction=True)

SITE = ROOT / "deploy" / "nginx-scale-out.conf"
SNIPPET = ROOT / "deploy" / "nginx" / "support.conf"
NGINX = "/usr/sbin/nginx"

ROLE = "support_scale"
# The role's timeouts (the README's block, its values filled in) and the hosts' settings agree.
LOCK_TIMEOUT_MS = 1000
STATEMENT_TIMEOUT_MS = 6000
POOL_SIZE = 4  # PgBouncer's server connections for (database, role)
APP_POOL = 4  # DB_POOL_MAX_SIZE: each worker's client connections to PgBouncer
POOL_TIMEOUT = 5  # DB_POOL_TIMEOUT, seconds
WORKERS = 2  # per instance
# As written in the README's blocks and deploy/nginx-scale-out.conf (production names).
README_ROLE = "ALTER ROLE support IN DATABASE support"
PROD_HOSTS = ("10.0.0.11:8000", "10.0.0.12:8000")
PROD_TLS_DIR = "/etc/nginx/tls/"
SECRET_KEY = "scale-out-" + "k" * 50


@dataclass
class TwoHosts:
    a: Server
    b: Server
    nginx_url: str
    nginx_tls_url: str
    tls: ssl.SSLContext
    access_log: Path  # nginx's: "<upstream> <status> <request>" per request
    pgbouncer: PgBouncer
    pgbouncer_dsn: str  # the app role through PgBouncer (libpq)
    direct_dsn: str  # the app role straight to PostgreSQL (libpq)
    host_env: dict[str, str]  # what each instance runs with (the README's lines filled in)
    dbname: str
    pg_log: Path  # the cluster's server log
    pg_log_start: int  # its size when the hosts started

    def client(self, where: str, token: str | None = None, **kwargs) -> httpx.Client:
        """A client of instance ``"a"``, instance ``"b"``, ``"nginx"`` (plain HTTP) or
        ``"nginx-tls"`` (the site's own TLS server)."""
        bases = {"a": self.a.base_url, "b": self.b.base_url, "nginx": self.nginx_url}
        bases["nginx-tls"] = self.nginx_tls_url
        if where == "nginx-tls":
            kwargs.setdefault("verify", self.tls)
        headers = {"Authorization": f"Token {token}"} if token else {}
        kwargs.setdefault("timeout", 15.0)
        return httpx.Client(base_url=bases[where], headers=headers, trust_env=False, **kwargs)

    def stats(self) -> dict:
        """PgBouncer's SHOW STATS row for the app's database."""
        (row,) = [r for r in self.pgbouncer.console("SHOW STATS") if r["database"] == self.dbname]
        return row

    def pg_log_since_start(self) -> str:
        with open(self.pg_log, errors="replace") as fh:
            fh.seek(self.pg_log_start)
            return fh.read()


# --- the README's blocks -------------------------------------------------------------------
def readme_block(name: str) -> str:
    return servers.readme_block("scale-out", name)


def bash(script: str) -> str:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"{script}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    return done.stdout


def env_lines(text: str) -> dict[str, str]:
    """NAME=value lines, quotes as systemd's EnvironmentFile reads them."""
    pairs = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            (pairs[name],) = shlex.split(value)
    return pairs


# --- the stack -------------------------------------------------------------------------------
def _superuser_url() -> str:
    cluster = getattr(test_settings, "CLUSTER", None)
    assert cluster is not None, "needs the session's throwaway cluster (a role is created)"
    return cluster.url("postgres")


@contextmanager
def app_role(password: str) -> Iterator[None]:
    """The app's role on the test database: it logs in and reads and writes the tables, and
    owns nothing; dropped with its privileges and settings at the end."""
    role = sql.Identifier(ROLE)
    with psycopg.connect(psycopg_conninfo("scale-out-setup"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, password))
        conn.execute(
            sql.SQL(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {}"
            ).format(role)
        )
        conn.execute(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {}").format(role))
    try:
        yield
    finally:
        with psycopg.connect(psycopg_conninfo("scale-out-setup"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(role))
            conn.execute(sql.SQL("DROP ROLE {}").format(role))


def _nginx_config(folder: Path, hosts: tuple[int, int], ports: dict[str, int]) -> tuple[Path, Path]:
    """deploy/nginx-scale-out.conf with the two hosts' ports, a certificate and the listen
    ports filled in (each exactly once), under a test-only main config with an access log of
    the upstreams each request went to. Returns the main config and the certificate's folder."""
    tls = self_signed_certificate(folder)
    site = SITE.read_text()
    replacements = {
        f"server {PROD_HOSTS[0]} ": f"server 127.0.0.1:{hosts[0]} ",
        f"server {PROD_HOSTS[1]} ": f"server 127.0.0.1:{hosts[1]} ",
        PROD_TLS_DIR + "fullchain.pem": f"{tls}/fullchain.pem",
        PROD_TLS_DIR + "privkey.pem": f"{tls}/privkey.pem",
        "listen 80;": f"listen 127.0.0.1:{ports['redirect']};",
        "listen 443 ssl http2;": f"listen 127.0.0.1:{ports['tls']} ssl http2;",
    }
    for old, new in replacements.items():
        assert site.count(old) == 1, f"{old!r} must appear exactly once in {SITE}"
        site = site.replace(old, new)
    (folder / "site.conf").write_text(site)
    (folder / "snippets").mkdir()
    (folder / "snippets" / "support.conf").symlink_to(SNIPPET)
    main = folder / "nginx.conf"
    main.write_text(
        f"""# Test-only stand-in for /etc/nginx/nginx.conf.
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
events {{
    worker_connections 256;
}}
http {{
    log_format upstreams '$upstream_addr $status "$request"';
    access_log {folder}/access.log upstreams;
    include site.conf;
    server {{
        listen 127.0.0.1:{ports["plain"]};
        include snippets/support.conf;
    }}
}}
"""
    )
    return main, tls


def run_nginx(config: Path, port: int):
    """nginx in the foreground with ``config`` (its folder as prefix), answering on ``port``."""
    folder = config.parent
    command = [NGINX, "-p", f"{folder}/", "-c", str(config)]
    command += ["-g", f"daemon off; pid {folder}/nginx.pid; error_log stderr;"]
    return serve_process(command, port=port, env={}, workers=1, label="nginx")


@pytest.fixture(scope="module")
def two_hosts(django_db_setup, tmp_path_factory) -> Iterator[TwoHosts]:
    assert connection.vendor == "postgresql", "the scale-out layout needs PostgreSQL"
    superuser = _superuser_url()
    folder = tmp_path_factory.mktemp("scale-out")
    db = connection.settings_dict
    dbname, pg_port = db["NAME"], int(db["PORT"])
    password = secrets.token_urlsafe(16)
    pg_log = Path(test_settings.CLUSTER.datadir) / "server.log"
    with ExitStack() as stack:
        stack.enter_context(app_role(password))
        # the README's blocks: the role's timeouts, then PgBouncer's userlist
        bash(
            fill(
                readme_block("role"),
                {
                    "runuser -u postgres -- psql": f"psql '{superuser}'",
                    README_ROLE: f"ALTER ROLE {ROLE} IN DATABASE {dbname}",
                    "lock_timeout = 3000": f"lock_timeout = {LOCK_TIMEOUT_MS}",
                    "statement_timeout = 15000": f"statement_timeout = {STATEMENT_TIMEOUT_MS}",
                },
            )
        )
        userlist = folder / "userlist.txt"
        console_password = secrets.token_urlsafe(12)
        userlist_block = fill(
            readme_block("userlist"),
            {
                "runuser -u postgres -- psql": f"psql '{superuser}'",
                "rolname = 'support'": f"rolname = '{ROLE}'",
                "/etc/pgbouncer/userlist.txt": str(userlist),
                "<console password>": console_password,
            },
        )
        if os.geteuid() != 0:  # only root may give the file to postgres
            userlist_block = userlist_block.replace("chown postgres:postgres", "true")
        bash(userlist_block)
        bouncer = stack.enter_context(
            run_pgbouncer(
                databases={dbname: f"host=127.0.0.1 port={pg_port} dbname={dbname}"},
                userlist_file=userlist,
                admin_password=console_password,
                settings={"default_pool_size": str(POOL_SIZE)},
            )
        )
        # each host's settings: the README's lines, the addresses filled in
        through = bouncer.url(dbname, user=ROLE, password=password)
        direct = through.replace(f":{bouncer.port}/", f":{pg_port}/")
        host_env = env_lines(
            fill(
                readme_block("env"),
                {
                    "postgres://support:change-me@pgbouncer.internal:6432/support": through,
                    "postgres://support:change-me@db.internal:5432/support": direct,
                    "'10.0.0.10'": "'127.0.0.1'",  # nginx's address
                },
            )
        )
        assert host_env["DB_POOLER"] == "pgbouncer"
        host_env.update(
            DB_LOCK_TIMEOUT_MS=str(LOCK_TIMEOUT_MS),
            DB_STATEMENT_TIMEOUT_MS=str(STATEMENT_TIMEOUT_MS),
            DB_POOL_MAX_SIZE=str(APP_POOL),
            DB_POOL_TIMEOUT=str(POOL_TIMEOUT),
        )
        pg_log_start = pg_log.stat().st_size
        a = stack.enter_context(run_uvicorn(workers=WORKERS, env=host_env))
        b = stack.enter_context(run_uvicorn(workers=WORKERS, env=host_env))
        ports = {"plain": free_port(), "tls": free_port(), "redirect": free_port()}
        nginx_conf, tls_dir = _nginx_config(folder, (a.port, b.port), ports)
        nginx = stack.enter_context(run_nginx(nginx_conf, ports["plain"]))
        pgbouncer_dsn = bouncer.dsn(dbname, user=ROLE, password=password)
        yield TwoHosts(
            a=a,
            b=b,
            nginx_url=nginx.base_url,
            nginx_tls_url=f"https://127.0.0.1:{ports['tls']}",
            tls=ssl.create_default_context(cafile=str(tls_dir / "fullchain.pem")),
            access_log=folder / "access.log",
            pgbouncer=bouncer,
            pgbouncer_dsn=pgbouncer_dsn,
            direct_dsn=pgbouncer_dsn.replace(f"port='{bouncer.port}'", f"port='{pg_port}'"),
            host_env=host_env,
            dbname=dbname,
            pg_log=pg_log,
            pg_log_start=pg_log_start,
        )


# --- across hosts ----------------------------------------------------------------------------
def test_a_ticket_created_through_a_is_read_and_fetched_through_b(two_hosts):
    """The hosts share nothing but the database (through PgBouncer): what one commits the
    other reads at once, and an agent's fetch on one takes a ticket created on the other."""
    admin, agent = create_user(staff=True), create_user(agent=True)
    with (
        two_hosts.client("a", admin.token) as admin_a,
        two_hosts.client("b", admin.token) as admin_b,
        two_hosts.client("b", agent.token) as agent_b,
        two_hosts.client("nginx-tls", agent.token) as agent_nginx,
    ):
        created = admin_a.post("/api/tickets/", json={"title": "printer on fire"})
        assert created.status_code == 201, created.text
        ticket = created.json()

        read = admin_b.get(f"/api/tickets/{ticket['id']}/")
        assert read.status_code == 200, read.text
        assert read.json() == ticket

        fetched = agent_b.get("/api/agent/tickets/")
        assert fetched.status_code == 200, fetched.text
        assert [(t["id"], t["status"], t["assigned_to"]) for t in fetched.json()] == [
            (ticket["id"], "assigned", agent.pk)
        ]

        # what B committed is what A reads, history included; a move through nginx's TLS
        assert admin_a.get(f"/api/tickets/{ticket['id']}/").json()["assigned_to"] == agent.pk
        history = admin_a.get(f"/api/tickets/{ticket['id']}/history/").json()
        assert [e["kind"] for e in history] == ["created", "assigned"]
        moved = agent_nginx.post(
            "/api/agent/tickets/", json={"ticket_id": ticket["id"], "status": "resolved"}
        )
        assert moved.status_code == 200, moved.text
        assert admin_b.get(f"/api/tickets/{ticket['id']}/").json()["status"] == "resolved"
    assert_invariants()


def test_a_waiter_on_b_is_woken_by_a_ticket_created_through_a(two_hosts):
    """B's workers listen straight to PostgreSQL; A's creation goes through PgBouncer and its
    NOTIFY, sent at commit, reaches B: the waiter is answered long before its deadline, with
    the ticket."""
    admin, agent = create_user(staff=True), create_user(agent=True)
    with (
        two_hosts.client("a", admin.token) as admin_a,
        two_hosts.client("b", agent.token, timeout=30) as agent_b,
        ThreadPoolExecutor(1) as pool,
    ):

        def wait_on_b():
            start = time.monotonic()
            response = agent_b.get("/api/agent/tickets/?wait=20")
            return response, time.monotonic() - start

        answer = pool.submit(wait_on_b)
        with two_hosts.client("b", admin.token) as admin_b:  # /metrics: admins may read it
            _until(lambda: _waiting_fetches(admin_b) == 1)
        created = admin_a.post("/api/tickets/", json={"title": "for whoever waits"})
        assert created.status_code == 201, created.text
        response, took = answer.result(timeout=30)
    assert response.status_code == 200, response.text
    assert [t["id"] for t in response.json()] == [created.json()["id"]]
    assert took < 10
    # a worker listens once it has had a waiter: one session each at most, never through
    # PgBouncer (whose server sessions carry no application_name of their own)
    with psycopg.connect(two_hosts.direct_dsn) as conn:
        assert 1 <= _listening(conn) <= 4


def test_an_event_stream_on_b_sees_what_a_commits(two_hosts):
    """B's feed reads the history straight from PostgreSQL: a ticket created and fetched
    through A reaches a stream held on B, in id order, and the same events read as JSON pages
    through nginx."""
    admin, agent = create_user(staff=True), create_user(agent=True)
    headers = {"Accept": "text/event-stream"}
    with (
        two_hosts.client("a", admin.token) as admin_a,
        two_hosts.client("a", agent.token) as agent_a,
        two_hosts.client("b", admin.token, timeout=30) as admin_b,
        two_hosts.client("nginx", admin.token) as admin_nginx,
    ):
        start = admin_nginx.get("/api/events/").json()["next_after"]
        with admin_b.stream("GET", f"/api/events/?after={start}", headers=headers) as stream:
            assert stream.status_code == 200
            created = admin_a.post("/api/tickets/", json={"title": "seen on b"})
            assert created.status_code == 201, created.text
            fetched = agent_a.get("/api/agent/tickets/")
            assert fetched.status_code == 200, fetched.text
            got = []
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    got.append(json.loads(line[5:]))
                if len(got) == 2:
                    break
        ticket = created.json()["id"]
        assert [(e["ticket"], e["kind"]) for e in got] == [
            (ticket, "created"),
            (ticket, "assigned"),
        ]
        assert got[0]["id"] < got[1]["id"]
        pages = admin_nginx.get(f"/api/events/?after={start}").json()["events"]
        assert [e["id"] for e in pages] == [e["id"] for e in got]
    with psycopg.connect(two_hosts.direct_dsn) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        feeds = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'support-events'"
        ).fetchone()[0]
    assert feeds <= 4  # at most one per worker, straight to PostgreSQL


def _listening(conn) -> int:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'support-listener'"
    ).fetchone()[0]


def _waiting_fetches(client: httpx.Client) -> float:
    """The fetches waiting for work on the host ``client`` speaks to, from its /metrics."""
    body = client.get("/metrics").text
    return sum(
        float(line.split()[1])
        for line in body.splitlines()
        if line.startswith("support_waiting_agents ")
    )


def _until(condition, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# --- through PgBouncer -----------------------------------------------------------------------
def _request_mix(client: httpx.Client, admin: str, agent: str, ticket_id: int, n: int) -> list:
    """One round of the hot requests: an agent's poll, the admin list (counters), a ticket, a
    search, a creation. Returns (method, path, status) for each."""
    calls = [
        ("GET", "/api/agent/tickets/", agent, None),
        ("GET", "/api/tickets/", admin, None),
        ("GET", f"/api/tickets/{ticket_id}/", admin, None),
        ("GET", "/api/tickets/?search=scale&page_size=5", admin, None),
        ("POST", "/api/tickets/", admin, {"title": f"scale-out {n}"}),
    ]
    done = []
    for method, path, token, body in calls:
        response = client.request(
            method, path, json=body, headers={"Authorization": f"Token {token}"}
        )
        done.append((method, path, response.status_code))
    return done


def _logged_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if '"level": "ERROR"' in line or "CRITICAL" in line]


SEQUENTIAL_ROUNDS = 12  # per host
THREADS, THREAD_ROUNDS = 7, 8  # through nginx


def test_repeated_and_concurrent_requests_all_go_through_pgbouncer(two_hosts):
    """The same statements many times on each worker's connections, on both hosts, one at a
    time and then concurrently through nginx: every request succeeds and no log mentions a
    prepared statement (with server-side binding and psycopg's threshold of 5 executions,
    these requests answer 500: the statement prepared on one server session is missing on
    the next). PgBouncer's console shows the traffic: its transaction count, client
    connections from both hosts' workers, at most POOL_SIZE server connections; PostgreSQL
    sees the app's role only through PgBouncer (and listening connections)."""
    admin = create_user(staff=True)
    agents = [create_user(agent=True) for _ in range(THREADS + 1)]
    tickets = create_tickets(admin, 150, description="scale out")
    before = two_hosts.stats()
    statuses = []

    # one at a time, on each host directly: each worker runs each statement many times
    for where in ("a", "b"):
        with two_hosts.client(where) as client:
            for n in range(SEQUENTIAL_ROUNDS):
                statuses += _request_mix(client, admin.token, agents[0].token, tickets[0].pk, n)

    # concurrently through nginx: transactions of several clients interleave on few servers
    def work(index: int) -> None:
        with two_hosts.client("nginx") as client:
            for n in range(THREAD_ROUNDS):
                statuses.extend(
                    _request_mix(
                        client, admin.token, agents[index].token, tickets[index].pk, 100 * index + n
                    )
                )

    threads = [threading.Thread(target=work, args=(i,)) for i in range(1, THREADS + 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)

    rounds = 2 * SEQUENTIAL_ROUNDS + THREADS * THREAD_ROUNDS
    assert len(statuses) == 5 * rounds
    failed = [s for s in statuses if s[2] not in (200, 201)]
    assert not failed, failed[:10]

    # nginx spread the requests over both hosts
    upstreams = {line.split()[0] for line in two_hosts.access_log.read_text().splitlines()}
    assert {f"127.0.0.1:{two_hosts.a.port}", f"127.0.0.1:{two_hosts.b.port}"} <= upstreams

    # PgBouncer carried them: a transaction at least per request
    after = two_hosts.stats()
    assert after["total_xact_count"] - before["total_xact_count"] >= len(statuses)
    pools = [p for p in two_hosts.pgbouncer.console("SHOW POOLS") if p["user"] == ROLE]
    assert [p["pool_mode"] for p in pools] == ["transaction"]
    servers = [s for s in two_hosts.pgbouncer.console("SHOW SERVERS") if s["user"] == ROLE]
    assert 1 <= len(servers) <= POOL_SIZE
    clients = [c for c in two_hosts.pgbouncer.console("SHOW CLIENTS") if c["user"] == ROLE]
    assert {c["application_name"] for c in clients} == {"support-tickets"}
    workers_a, workers_b = two_hosts.a.worker_pids(), two_hosts.b.worker_pids()
    owners = {tcp_port_owner(c["port"], workers_a + workers_b) for c in clients}
    assert set(workers_a) & owners, f"no client connection from host A: {clients}"
    assert set(workers_b) & owners, f"no client connection from host B: {clients}"

    # PostgreSQL's side: the role's sessions are PgBouncer's, but for listening ones
    with psycopg.connect(psycopg_conninfo("scale-out-check"), autocommit=True) as conn:
        sessions = conn.execute(
            "SELECT client_port, application_name FROM pg_stat_activity WHERE usename = %s",
            [ROLE],
        ).fetchall()
    from_bouncer = [s for s in sessions if tcp_port_owner(s[0], [two_hosts.pgbouncer.pid])]
    assert len(from_bouncer) == len(servers), sessions
    others = [name for port, name in sessions if (port, name) not in from_bouncer]
    # straight to PostgreSQL: only the workers' listening connections and event feeds
    assert set(others) <= {"support-listener", "support-events"}, others
    assert len(others) <= 2 * 2 * WORKERS

    # no server-side prepared statement anywhere, nor any error in the hosts' logs
    logs = {
        "host A": two_hosts.a.log(),
        "host B": two_hosts.b.log(),
        "pgbouncer": two_hosts.pgbouncer.log(),
        "postgresql": two_hosts.pg_log_since_start(),
    }
    for name, text in logs.items():
        assert "prepared statement" not in text, f"{name}: {text[-2000:]}"
    for name in ("host A", "host B"):
        assert _logged_errors(logs[name]) == [], name
    assert Ticket.objects.filter(title__startswith="scale-out ").count() == rounds
    assert_invariants()


def test_the_roles_timeouts_hold_through_pgbouncer(two_hosts):
    """Through PgBouncer, with the app's role, a session has the hosts' lock and statement
    timeouts; and an agent whose row is locked by an outside session gets its 503 from
    either host after the lock timeout, long before the statement timeout would end the
    wait."""
    names = ("lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout")
    with psycopg.connect(two_hosts.pgbouncer_dsn, autocommit=True) as conn:
        shown = {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in names}
    assert shown == {
        "lock_timeout": f"{LOCK_TIMEOUT_MS // 1000}s",
        "statement_timeout": f"{STATEMENT_TIMEOUT_MS // 1000}s",
        "idle_in_transaction_session_timeout": "1min",
    }

    admin, agent = create_user(staff=True), create_user(agent=True)
    create_tickets(admin, 20)
    lock_timeout = LOCK_TIMEOUT_MS / 1000
    with psycopg.connect(psycopg_conninfo("scale-out-locker")) as locker:
        locker.execute("SELECT id FROM auth_user WHERE id = %s FOR UPDATE", [agent.pk])
        for where in ("a", "b"):
            with two_hosts.client(where, agent.token) as client:
                start = time.monotonic()
                response = client.get("/api/agent/tickets/")
                took = time.monotonic() - start
            assert response.status_code == 503, response.text
            assert response.json()["detail"]
            assert response.headers["retry-after"] == "1"
            assert took >= 0.9 * lock_timeout, (
                f"{where}: it did not wait for the lock ({took:.2f}s)"
            )
            assert took < lock_timeout + 1.5, f"{where}: {took:.2f}s, lock timeout {lock_timeout}s"
        locker.rollback()
    with two_hosts.client("nginx", agent.token) as client:
        response = client.get("/api/agent/tickets/")
    assert response.status_code == 200
    assert len(response.json()) == 15
    assert_invariants()


RECOVERY = 3.0  # seconds after PostgreSQL is back by which every request is served again


def test_postgres_restarted_behind_pgbouncer_serves_again_without_restarting_anything(two_hosts):
    """PostgreSQL down 1.5 s and back, under requests through nginx to both hosts: no request
    hangs (at worst a 503 after the pool timeout), and every request that ends RECOVERY
    seconds after the database is back is served, without restarting PgBouncer or the hosts.
    PgBouncer tries to log in again every server_login_retry (1 s in deploy/pgbouncer.ini;
    with its default, 15 s, this fails: requests answer 503 for the whole 15 s)."""
    cluster = test_settings.CLUSTER
    admin = create_user(staff=True)
    release_test_connections()
    calls: list[tuple[float, float, int]] = []  # (start, end, status)
    stop = threading.Event()

    def load() -> None:
        with two_hosts.client("nginx", admin.token, timeout=30) as client:
            while not stop.is_set():
                start = time.time()
                try:
                    status = client.get("/api/tickets/?page_size=5").status_code
                except httpx.TransportError:
                    status = 0
                calls.append((start, time.time(), status))
                time.sleep(0.02)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        cluster.stop("fast")
        time.sleep(1.5)
        cluster.start()  # pg_ctl -w: returns once the server accepts connections
        up = time.time()
        time.sleep(RECOVERY + 2.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert {status for _, _, status in calls} <= {200, 503}, calls
    slowest = max(end - start for start, end, _ in calls)
    assert slowest < POOL_TIMEOUT + 3, f"a request took {slowest:.2f}s"
    late = [c for c in calls if c[1] > up + RECOVERY]
    assert len(late) >= 20, "too little load after the restart"
    assert all(status == 200 for _, _, status in late), [c for c in late if c[2] != 200][:5]
    first_ok = min(end for _, end, status in calls if status == 200 and end > up)
    print(f"\nrestart behind PgBouncer: first success {first_ok - up:.2f}s after the database")
    assert two_hosts.a.proc.poll() is None
    assert two_hosts.b.proc.poll() is None
    assert two_hosts.pgbouncer.proc.poll() is None


def test_a_host_that_is_down_costs_nginx_three_tries_then_is_left_out(two_hosts, tmp_path):
    """The same site with its second host down (nothing listens on its port): every request,
    POSTs included, is served by the first host; nginx tries the dead one max_fails (3) times,
    retrying each of those requests on the live host, then leaves it out for fail_timeout."""
    admin = create_user(staff=True)
    down = free_port()
    ports = {"plain": free_port(), "tls": free_port(), "redirect": free_port()}
    config, _ = _nginx_config(tmp_path, (two_hosts.a.port, down), ports)
    statuses = []
    with (
        run_nginx(config, ports["plain"]) as nginx,
        httpx.Client(
            base_url=nginx.base_url, headers={"Authorization": f"Token {admin.token}"}, timeout=15
        ) as client,
    ):
        for n in range(20):  # a POST first: it meets the dead host (round robin)
            statuses.append(
                client.post("/api/tickets/", json={"title": f"failover {n}"}).status_code
            )
            statuses.append(client.get("/api/tickets/").status_code)
    assert statuses == [201, 200] * 20
    assert Ticket.objects.filter(title__startswith="failover ").count() == 20
    lines = [line for line in (tmp_path / "access.log").read_text().splitlines() if "/api/" in line]
    assert len(lines) == 40
    tried_down = [line for line in lines if f"127.0.0.1:{down}" in line]
    assert 1 <= len(tried_down) <= 3, tried_down
    assert any('"POST ' in line for line in tried_down), tried_down  # never sent: safe
    # each of those went on to the live host: "<down>, <live>"
    assert all(
        line.split(" ", 2)[:2] == [f"127.0.0.1:{down},", f"127.0.0.1:{two_hosts.a.port}"]
        for line in tried_down
    ), tried_down


# --- a host's start --------------------------------------------------------------------------
def _serve(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m project.serve`` with the host's settings, expected to stop by itself."""
    command = [sys.executable, "-m", "project.serve", "--port", str(free_port()), *args]
    full = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DJANGO_SECRET_KEY": SECRET_KEY,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
        **env,
    }
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        stop_process(proc)
    return subprocess.CompletedProcess(command, proc.returncode, output, "")


def _critical(output: str) -> dict:
    (line,) = [json.loads(line) for line in output.splitlines() if '"CRITICAL"' in line]
    return line


def test_a_host_whose_timeouts_differ_from_the_roles_does_not_start(two_hosts):
    """A host configured with another lock timeout than the role has stops before serving,
    saying which setting differs and the statement that fixes it; check --deploy says the
    same, and passes with the host's real settings."""
    wrong = {**two_hosts.host_env, "DB_LOCK_TIMEOUT_MS": str(2 * LOCK_TIMEOUT_MS)}
    done = _serve(wrong, "--no-migrate")
    assert done.returncode == 2, done.stdout
    line = _critical(done.stdout)
    assert line["problems"] == [
        f"lock_timeout is {LOCK_TIMEOUT_MS} ms through the pooler (source: database user), "
        f"the service expects {2 * LOCK_TIMEOUT_MS} (DB_LOCK_TIMEOUT_MS)"
    ]
    fix = f'ALTER ROLE "{ROLE}" IN DATABASE "{two_hosts.dbname}" SET lock_timeout = 2000;'
    assert fix in line["fix"]
    assert "Uvicorn running" not in done.stdout

    check = [sys.executable, "manage.py", "check", "--deploy", "--tag", "database"]
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings"}
    env["DJANGO_SECRET_KEY"] = SECRET_KEY
    refused = subprocess.run(
        check, cwd=ROOT, env={**env, **wrong}, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1
    assert "support.E003" in refused.stderr
    assert f"lock_timeout is {LOCK_TIMEOUT_MS} ms through the pooler" in refused.stderr
    assert fix in refused.stderr
    passed = subprocess.run(
        check,
        cwd=ROOT,
        env={**env, **two_hosts.host_env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert passed.returncode == 0, passed.stderr


def test_a_host_migrates_on_the_direct_connection_and_needs_its_pooler_to_serve(two_hosts):
    """The start migrates over SUPPORT_LISTEN_DATABASE_URL (PostgreSQL itself), so with
    PgBouncer unreachable the migration still runs, and then the start stops: it could not
    read the timeouts through the pooler."""
    closed = free_port()
    env = {
        **two_hosts.host_env,
        "DATABASE_URL": two_hosts.host_env["DATABASE_URL"].replace(
            f":{two_hosts.pgbouncer.port}/", f":{closed}/"
        ),
    }
    done = _serve(env)
    assert done.returncode == 2, done.stdout
    assert '"message": "migrations done"' in done.stdout
    (problem,) = _critical(done.stdout)["problems"]
    assert problem.startswith("could not read the session settings through the pooler")
    assert str(closed) in problem


# --- why ------------------------------------------------------------------------------------
def test_pgbouncer_refuses_what_the_app_does_not_do(two_hosts):
    """Why the app runs as it does through PgBouncer 1.18 in transaction pooling: a
    connection that sends "options" is refused; a statement psycopg prepared, or a cursor
    held open, is missing on the next server session the client is lent. The app's own
    connections send no options and prepare nothing (the tests above)."""
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter: options"):
        psycopg.connect(two_hosts.pgbouncer_dsn, options="-c lock_timeout=5000")

    with (
        psycopg.connect(two_hosts.pgbouncer_dsn, autocommit=True) as first,
        psycopg.connect(two_hosts.pgbouncer_dsn, autocommit=True) as second,
    ):
        first.execute("SELECT %s::int", [1], prepare=True)  # prepared on the server it is lent
        first.execute("DECLARE held CURSOR WITH HOLD FOR SELECT 1")  # on the same one
        second.execute("BEGIN")
        second.execute("SELECT 1")  # takes that server session (PgBouncer reuses the last one)
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            first.execute("SELECT %s::int", [1], prepare=True)
        with pytest.raises(psycopg.errors.InvalidCursorName):
            first.execute("FETCH held")
        second.execute("COMMIT")


def test_settings_through_pgbouncer():
    """DB_POOLER=pgbouncer: no startup options, nothing prepared, no server-side cursors, a
    direct listening URL required; an unknown pooler, or SQLite behind one, refused."""
    script = (
        "import django, json; django.setup(); from django.db import connection; "
        "params = connection.get_connection_params(); "
        "print(json.dumps({'options': params.get('options'), "
        "'prepare_threshold': params['prepare_threshold'], 'server_side_cursors': "
        "not connection.settings_dict.get('DISABLE_SERVER_SIDE_CURSORS', False)}))"
    )

    def run(**env):
        full = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "project.settings",
            "DJANGO_SECRET_KEY": SECRET_KEY,
            **env,
        }
        for name in ("DB_POOLER", "SUPPORT_LISTEN_DATABASE_URL"):
            if name not in env:
                full.pop(name, None)
        return subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env=full,
            capture_output=True,
            text=True,
            timeout=60,
        )

    through = "postgres://app:pw@pgbouncer.internal:6432/support"
    direct = "postgres://app:pw@db.internal:5432/support"
    done = run(DATABASE_URL=through, DB_POOLER="pgbouncer", SUPPORT_LISTEN_DATABASE_URL=direct)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "options": None,
        "prepare_threshold": None,
        "server_side_cursors": False,
    }

    done = run(DATABASE_URL=direct, DB_LOCK_TIMEOUT_MS="1234", DB_STATEMENT_TIMEOUT_MS="5678")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "options": "-c lock_timeout=1234 -c statement_timeout=5678"
        " -c idle_in_transaction_session_timeout=60000",
        "prepare_threshold": None,
        "server_side_cursors": True,
    }

    pgbouncer = {"DATABASE_URL": through, "DB_POOLER": "pgbouncer"}
    for env, message in (
        (pgbouncer, "set SUPPORT_LISTEN_DATABASE_URL"),
        ({**pgbouncer, "SUPPORT_LISTEN_DATABASE_URL": through}, "set SUPPORT_LISTEN_DATABASE_URL"),
        ({"DATABASE_URL": direct, "DB_POOLER": "pgpool"}, "DB_POOLER must be none or pgbouncer"),
        (
            {**pgbouncer, "DATABASE_URL": "sqlite:///x.db", "SUPPORT_LISTEN_DATABASE_URL": direct},
            "needs a PostgreSQL DATABASE_URL",
        ),
    ):
        done = run(**env)
        assert done.returncode != 0, env
        assert "ImproperlyConfigured" in done.stderr, done.stderr
        assert message in done.stderr, done.stderr
