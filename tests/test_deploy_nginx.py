"""Deployment, end to end: Debian's nginx with the repository's site config in front of uvicorn.

uvicorn runs as in production (``python -m project.serve --uds ... --workers 2`` with
``FORWARDED_ALLOW_IPS='*'``: project.settings, debug off, two workers on a unix socket) on this
session's throwaway PostgreSQL test database; the tests write committed data there
(``transaction=True``), so the workers see it.

nginx runs ``deploy/nginx.conf`` (and the ``deploy/nginx/support.conf`` snippet it includes,
unchanged) with four substitutions: the socket path, the certificate folder and the two listen
ports, each of which must appear exactly once as written there. Around it, a small main config
stands for ``/etc/nginx/nginx.conf`` and adds what only the test needs: an access log showing
``$connection``/``$connection_requests``, and a plain-HTTP server that includes the same snippet
(so ``$scheme`` is ``http`` there, while the site's own TLS server has ``https``).

A second uvicorn on a loopback TCP port, trusting forwarded headers from 127.0.0.2 only, stands
for a client that reaches the app without nginx.
"""

import json
import os
import re
import secrets
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from django.conf import settings
from django.contrib.auth.hashers import PBKDF2PasswordHasher, make_password
from django.db import connection

from support.models import Ticket
from tests.conftest import PASSWORD, create_user
from tests.invariants import assert_invariants
from tests.servers import (
    accepts_unix,
    database_url,
    free_port,
    self_signed_certificate,
    stop_process,
)

# The stack's workers use the test database (and migrate it, as in production): every test
# here declares it, so it exists even when one test runs alone.
pytestmark = pytest.mark.django_db(transaction=True)

REPO = Path(__file__).resolve().parent.parent
SITE = REPO / "deploy" / "nginx.conf"
SNIPPET = REPO / "deploy" / "nginx" / "support.conf"
COMPOSE = REPO / "docker-compose.yml"
NGINX = "/usr/sbin/nginx"

# As written in deploy/nginx.conf (production paths).
PROD_SOCKET = "/run/support/uvicorn.sock"
PROD_TLS_DIR = "/etc/nginx/tls/"
SNIPPET_INCLUDE = "include snippets/support.conf;"

LIMIT = 1024 * 1024  # MAX_REQUEST_BODY_BYTES and nginx's client_max_body_size 1m
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
NGINX_413 = b"413 Request Entity Too Large"
APP_413 = {"detail": "Request body too large."}


def serve_args(socket_path: str) -> list[str]:
    """The production command's arguments (README: Production); docker-compose.yml runs the
    same, with FORWARDED_ALLOW_IPS='*' (PROXY_TRUST)."""
    return ["-m", "project.serve", "--uds", socket_path, "--workers", "2"]


PROXY_TRUST = {"FORWARDED_ALLOW_IPS": "*"}


def _substitute(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert text.count(old) == 1, f"{old!r} must appear exactly once in {SITE}"
        text = text.replace(old, new)
    return text


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no output)"


@dataclass
class Stack:
    tmp: Path
    socket: str
    plain_port: int
    tls_port: int
    redirect_port: int
    direct_port: int
    tls: ssl.SSLContext
    processes: dict[str, tuple[subprocess.Popen, Path]]

    @property
    def access_log(self) -> Path:
        return self.tmp / "access.log"

    def client(self, server: str, token: str | None = None, **kwargs) -> httpx.Client:
        """A client of nginx's plain-HTTP ("plain") or TLS ("tls") server, or of the uvicorn
        on a unix socket ("uds") or on TCP ("direct")."""
        headers = {"Authorization": f"Token {token}"} if token else {}
        if server == "plain":
            base = f"http://127.0.0.1:{self.plain_port}"
        elif server == "tls":
            base = f"https://127.0.0.1:{self.tls_port}"
            kwargs.setdefault("verify", self.tls)
        elif server == "uds":
            base = "http://localhost"
            kwargs.setdefault("transport", httpx.HTTPTransport(uds=self.socket))
        elif server == "direct":
            base = f"http://127.0.0.1:{self.direct_port}"
        else:
            raise ValueError(server)
        return httpx.Client(base_url=base, headers=headers, timeout=10.0, trust_env=False, **kwargs)

    def wait_for(self, check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name, (proc, log) in self.processes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{_tail(log)}")
            try:
                if check():
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{_tail(log)}" for n, (_, log) in self.processes.items())
                raise TimeoutError(f"{what}: not within {timeout}s\n{logs}")
            time.sleep(0.1)

    def log_lines(self, path: Path, needle: str, count: int = 1) -> list[str]:
        """The lines of a log holding ``needle``, once there are ``count`` of them."""
        found: list[str] = []

        def enough() -> bool:
            found[:] = [line for line in path.read_text().splitlines() if needle in line]
            return len(found) >= count

        self.wait_for(enough, f"{count} line(s) with {needle!r} in {path.name}")
        return found

    def upstream_connections(self) -> set[str]:
        """Inodes of the connections uvicorn has accepted on its socket (only nginx connects).

        /proc/net/unix: Num RefCount Protocol Flags Type St Inode Path, St 03 = connected;
        accepted sockets carry the listening socket's path.
        """
        with open("/proc/net/unix") as fh:
            rows = [line.split() for line in fh.readlines()[1:]]
        return {
            row[6] for row in rows if len(row) == 8 and row[7] == self.socket and row[5] == "03"
        }


def _database_url() -> str:
    assert connection.vendor == "postgresql", "the deployment test needs PostgreSQL"
    return database_url()


def _write_nginx_config(stack: Stack, tls_dir: Path) -> Path:
    tmp = stack.tmp
    site = _substitute(
        SITE.read_text(),
        {
            f"unix:{PROD_SOCKET};": f"unix:{stack.socket};",
            PROD_TLS_DIR + "fullchain.pem": f"{tls_dir}/fullchain.pem",
            PROD_TLS_DIR + "privkey.pem": f"{tls_dir}/privkey.pem",
            "listen 80;": f"listen 127.0.0.1:{stack.redirect_port};",
            "listen 443 ssl http2;": f"listen 127.0.0.1:{stack.tls_port} ssl http2;",
        },
    )
    (tmp / "site.conf").write_text(site)
    # Relative includes resolve against the main config's folder, as against /etc/nginx/.
    (tmp / "snippets").mkdir()
    (tmp / "snippets" / "support.conf").symlink_to(SNIPPET)
    user = "user root;  # workers must reach the socket in the test's folder\n"
    main = tmp / "nginx.conf"
    main.write_text(
        f"""# Test-only stand-in for /etc/nginx/nginx.conf.
{user if os.geteuid() == 0 else ""}worker_processes 1;
events {{
    worker_connections 64;
}}
http {{
    log_format connections '$connection $connection_requests $status "$request"';
    access_log {tmp}/access.log connections;
    include site.conf;
    # Plain HTTP in front of the same snippet: here nginx's $scheme is http.
    server {{
        listen 127.0.0.1:{stack.plain_port};
        {SNIPPET_INCLUDE}
    }}
}}
"""
    )
    return main


def _start(name: str, command: list[str], stack: Stack, env: dict | None = None) -> None:
    log = stack.tmp / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    stack.processes[name] = (proc, log)


@pytest.fixture(scope="module")
def stack(django_db_setup, tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("deploy")
    tls_dir = self_signed_certificate(tmp)
    tls = ssl.create_default_context(cafile=str(tls_dir / "fullchain.pem"))
    stack = Stack(
        tmp=tmp,
        socket=str(tmp / "uvicorn.sock"),
        plain_port=free_port(),
        tls_port=free_port(),
        redirect_port=free_port(),
        direct_port=free_port(),
        tls=tls,
        processes={},
    )
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DJANGO_", "DATABASE_", "DB_", "MAX_REQUEST_"))
    }
    env.update(
        DJANGO_SETTINGS_MODULE="project.settings",
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
        DJANGO_SECURE_SSL_REDIRECT="0",
        DATABASE_URL=_database_url(),
        DB_POOL_MAX_SIZE="4",
        SUPPORT_EVENTS_HEARTBEAT_SECONDS="1",
    )
    nginx_conf = _write_nginx_config(stack, tls_dir)
    try:
        _start("uvicorn", [sys.executable, *serve_args(stack.socket)], stack, env | PROXY_TRUST)
        # The same app on TCP, trusting forwarded headers only from 127.0.0.2: a client on
        # 127.0.0.1 is someone who bypassed the proxy.
        direct = ["--host", "127.0.0.1", "--port", str(stack.direct_port), "--workers", "1"]
        _start(
            "uvicorn-direct",
            [sys.executable, "-m", "project.serve", "--no-migrate", *direct],
            stack,
            env | {"FORWARDED_ALLOW_IPS": "127.0.0.2"},
        )
        _start(
            "nginx",
            [
                NGINX,
                "-p",
                f"{tmp}/",
                "-c",
                str(nginx_conf),
                "-g",
                f"daemon off; pid {tmp}/nginx.pid; error_log stderr;",
            ],
            stack,
        )
        # httpx leaks its socket when a unix socket refuses the connection: wait with a plain
        # socket until uvicorn listens there.
        stack.wait_for(lambda: accepts_unix(stack.socket), "uvicorn's socket", STARTUP_TIMEOUT)
        for server in ("uds", "direct", "plain", "tls"):
            with stack.client(server) as client:
                stack.wait_for(
                    lambda client=client: client.get("/healthz").status_code == 200,
                    f"/healthz through {server}",
                    timeout=STARTUP_TIMEOUT,
                )
        yield stack
    finally:
        for name in ("nginx", "uvicorn-direct", "uvicorn"):
            if name in stack.processes:
                stop_process(stack.processes[name][0])


def _hsts(response: httpx.Response) -> bool:
    """Django's SecurityMiddleware sends HSTS on secure requests only: request.is_secure()."""
    return response.headers.get("strict-transport-security", "").startswith("max-age=")


def test_agent_flow_through_nginx(stack):
    """Over nginx's TLS server: an admin files tickets and makes an agent, the agent logs in,
    gets its 15 (highest priority first), resolves and closes one, and is topped up again."""
    admin = create_user(staff=True)
    priorities = ["low", "normal", "high", "urgent"]
    password = secrets.token_urlsafe(16)
    with stack.client("tls", admin.token) as api:
        for n in range(20):
            response = api.post(
                "/api/tickets/", json={"title": f"via nginx {n}", "priority": priorities[n % 4]}
            )
            assert response.status_code == 201, response.text
            assert response.json()["created_by"] == admin.pk
        response = api.post("/api/agents/", json={"username": "edge", "password": password})
        assert response.status_code == 201, response.text
        agent_id = response.json()["id"]

    with stack.client("tls") as anonymous:
        response = anonymous.post(
            "/api/auth/token/", json={"username": "edge", "password": password}
        )
        assert response.status_code == 200, response.text
        token = response.json()["token"]
        assert anonymous.get("/api/agent/tickets/").status_code == 401

    with stack.client("tls", token) as agent:
        response = agent.get("/api/agent/tickets/")
        assert response.status_code == 200, response.text
        held = response.json()
        assert len(held) == 15
        assert {t["status"] for t in held} == {"assigned"}
        assert {t["assigned_to"] for t in held} == {agent_id}
        assert "low" not in {t["priority"] for t in held}  # 5 urgent, 5 high, 5 normal

        ticket_id = held[0]["id"]
        for status in ("resolved", "closed"):
            response = agent.post(
                "/api/agent/tickets/", json={"ticket_id": ticket_id, "status": status}
            )
            assert response.status_code == 200, response.text
            assert response.json()["status"] == status

        response = agent.get("/api/agent/tickets/")
        assert response.status_code == 200
        again = {t["id"] for t in response.json()}
        assert len(again) == 15
        assert ticket_id not in again
        assert len(again - {t["id"] for t in held}) == 1  # one more from the pool

    assert Ticket.objects.filter(status="closed").count() == 1
    assert Ticket.objects.filter(status="assigned").count() == 15
    assert Ticket.objects.filter(status="open").count() == 4
    assert_invariants()


def test_the_event_stream_passes_through_nginx_as_it_happens(stack):
    """Over nginx's TLS server: the stream's first line, its heartbeats and each event reach
    the client as the app sends them, not when a buffer fills."""
    admin = create_user(staff=True)
    sse = {"Accept": "text/event-stream"}
    with (
        stack.client("tls", admin.token) as api,
        stack.client("tls", admin.token) as listener,
        listener.stream("GET", "/api/events/", headers=sse) as stream,
    ):
        assert stream.status_code == 200
        assert stream.headers["content-type"] == "text/event-stream"
        chunks = stream.iter_raw()
        assert next(chunks) == b"retry: 1000\n\n"
        position = next(chunks)  # where the stream starts: "now"
        assert re.fullmatch(rb"id: [0-9]+\n\n", position), position
        started = time.monotonic()
        # the app's heartbeat, every second here, with the position
        assert next(chunks) == b": ping\n" + position
        assert time.monotonic() - started < 3
        created = api.post("/api/tickets/", json={"title": "streamed through nginx"})
        assert created.status_code == 201
        sent = time.monotonic()
        received = b""
        while b"event: created" not in received:
            received += next(chunks)
        assert time.monotonic() - sent < 2
        assert f'"ticket":{created.json()["id"]}'.encode() in received


def test_nginx_on_another_port_links_and_admin_login_keep_that_port(stack):
    """nginx's TLS server here listens on a port of its own, not 443: the list's links carry
    it, and the admin site's login passes Django's CSRF origin check without any
    DJANGO_CSRF_TRUSTED_ORIGINS (nginx passes the Host as the client sent it)."""
    admin = create_user(staff=True)
    # the server hashes as production does; the tests' fast hasher is not among its hashers
    admin.password = make_password(PASSWORD, hasher=PBKDF2PasswordHasher())
    admin.save(update_fields=["password"])
    origin = f"https://127.0.0.1:{stack.tls_port}"
    with stack.client("tls", admin.token) as api:
        for n in range(3):
            assert api.post("/api/tickets/", json={"title": f"t{n}"}).status_code == 201
        page = api.get("/api/tickets/?page_size=1").json()
    assert page["next"].startswith(f"{origin}/api/tickets/?"), page["next"]

    with stack.client("tls") as browser:
        form = browser.get("/admin/login/")
        assert form.status_code == 200
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text).group(1)
        login = browser.post(
            "/admin/login/?next=/admin/",
            data={"username": admin.username, "password": PASSWORD, "csrfmiddlewaretoken": token},
            headers={"Origin": origin, "Referer": f"{origin}/admin/login/"},
        )
    assert login.status_code == 302, login.text[:500]
    assert login.headers["location"] == "/admin/"


def test_forwarded_headers_count_only_from_the_proxy(stack):
    """The client's X-Forwarded-Proto/-For never reach the app through nginx; nginx's own do
    (its TLS server makes request.is_secure() true); a client that bypasses nginx cannot fake
    them either, while the same headers from the trusted address are honoured."""
    probe = uuid.uuid4().hex
    forged = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"}
    with stack.client("plain") as client:
        response = client.get("/api/tickets/", headers={**forged, "X-Request-ID": probe})
    assert response.status_code == 401
    assert not _hsts(response)  # the app saw plain http
    uvicorn_log = stack.processes["uvicorn"][1]
    (line,) = stack.log_lines(uvicorn_log, f'"request_id": "{probe}"')
    access = json.loads(line)  # the app's access line
    assert access["logger"] == "support.request"
    assert access["client"] == "127.0.0.1"  # the client's address as nginx saw it

    with stack.client("tls") as client:
        response = client.get("/api/tickets/", headers={"X-Forwarded-Proto": "http"})
    assert response.status_code == 401
    assert _hsts(response)  # nginx said https, whatever the client said

    with stack.client("direct") as client:
        response = client.get("/api/tickets/", headers=forged)
    assert response.status_code == 401
    assert not _hsts(response)

    # Control: from the address uvicorn trusts, the very same header is honoured.
    trusted = httpx.HTTPTransport(local_address="127.0.0.2")
    with stack.client("direct", transport=trusted) as client:
        response = client.get("/api/tickets/", headers=forged)
    assert response.status_code == 401
    assert _hsts(response)


def test_plain_http_site_redirects_to_https(stack):
    port = stack.redirect_port
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as client:
        response = client.post("/api/tickets/?page=2", json={"title": "never proxied"})
    assert response.status_code == 301
    assert response.headers["location"] == "https://127.0.0.1/api/tickets/?page=2"


def _json_body(size: int) -> bytes:
    """A valid ticket as JSON, padded with whitespace to ``size`` bytes."""
    body = b'{"title": "body limit"}'
    return body + b" " * (size - len(body))


def _chunks(body: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """A body httpx sends chunked (no Content-Length)."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_body_limits_agree(stack):
    """nginx and the app refuse the same sizes: exactly 1 MiB passes both, one byte more is
    413 from nginx (declared or chunked) and 413 from the app when sent to uvicorn directly."""
    assert settings.MAX_REQUEST_BODY_BYTES == LIMIT
    admin = create_user(staff=True)
    headers = {"Authorization": f"Token {admin.token}", "Content-Type": "application/json"}

    with stack.client("tls") as client:
        response = client.post("/api/tickets/", content=_json_body(LIMIT), headers=headers)
        assert response.status_code == 201, response.text
        for content in (
            _json_body(LIMIT + 1),
            _json_body(2 * LIMIT),
            _chunks(_json_body(LIMIT + 1)),
        ):
            response = client.post("/api/tickets/", content=content, headers=headers)
            assert response.status_code == 413
            assert NGINX_413 in response.content  # nginx's page: the app never saw it

    with stack.client("uds") as client:
        for content in (_json_body(LIMIT + 1), _chunks(_json_body(LIMIT + 1))):
            response = client.post("/api/tickets/", content=content, headers=headers)
            assert response.status_code == 413
            assert response.json() == APP_413

    assert Ticket.objects.count() == 1


def test_keepalive_to_the_client_and_to_uvicorn(stack):
    """Five requests on one client connection: nginx counts them on one connection, and
    forwards them all over one kept-alive connection to uvicorn."""
    marker = uuid.uuid4().hex
    upstream = []
    with stack.client("plain") as client:
        for n in range(5):
            assert client.get(f"/healthz?keepalive={marker}-{n}").status_code == 200
            upstream.append(stack.upstream_connections())

    lines = stack.log_lines(stack.access_log, marker, count=5)
    assert len({line.split()[0] for line in lines}) == 1  # $connection
    assert [int(line.split()[1]) for line in lines] == [1, 2, 3, 4, 5]  # $connection_requests
    assert all(line.split()[2] == "200" for line in lines)

    assert len(upstream[0]) == 1, upstream
    assert all(seen == upstream[0] for seen in upstream), upstream


def _mounts(service: dict) -> dict[str, str]:
    """container path -> source (a host path or a volume name) of a service's volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        mounts[target] = source
    return mounts


def test_compose_runs_what_this_test_runs():
    """docker-compose.yml mounts the same nginx files and runs the same uvicorn command."""
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    db, app, nginx = services["db"], services["app"], services["nginx"]

    site = SITE.read_text()
    assert f"server unix:{PROD_SOCKET};" in site
    assert SNIPPET_INCLUDE in site
    nginx_mounts = _mounts(nginx)
    assert (REPO / nginx_mounts["/etc/nginx/conf.d/default.conf"]).resolve() == SITE
    assert (REPO / nginx_mounts["/etc/nginx/snippets/support.conf"]).resolve() == SNIPPET
    assert PROD_TLS_DIR.rstrip("/") in nginx_mounts

    # One volume holds the socket, for both.
    socket_dir = os.path.dirname(PROD_SOCKET)
    app_mounts = _mounts(app)
    assert app_mounts[socket_dir] == nginx_mounts[socket_dir]
    assert app_mounts[socket_dir] in compose["volumes"]

    assert app["command"] == ["python", *serve_args(PROD_SOCKET)]

    env = app["environment"]
    assert {name: env[name] for name in PROXY_TRUST} == PROXY_TRUST
    assert env["DJANGO_DEBUG"] == "0"
    assert env["DATABASE_URL"].startswith("postgres://")
    assert "@db:5432/" in env["DATABASE_URL"]

    assert db["image"].startswith("postgres:15")
    assert nginx["image"].startswith("nginx:")
    assert db["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    app_check = " ".join(app["healthcheck"]["test"])
    assert "/healthz" in app_check
    assert PROD_SOCKET in app_check
    assert app["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert nginx["depends_on"] == {"app": {"condition": "service_healthy"}}
