"""A real uvicorn serving the app on loopback against this session's test database.

``run_uvicorn(workers=2, env={...})`` starts the app as production does, with ``python -m
project.serve`` (uvicorn, the service's logging, a metrics folder shared by the workers), on a
free TCP port, without migrating (the test database is), with production settings (debug off, a
secret key, no SSL redirect) and ``DATABASE_URL`` pointing at the database the tests use (so
data committed by a ``transaction=True`` test is what the server sees). It waits for
``/healthz``, writes the server's output to a temporary file that is added to any exception
raised inside the ``with`` block, and always stops the server: terminate, wait, then kill its
process group (the server and the workers it started).
"""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
from asgiref.sync import SyncToAsync
from django.db import connection, connections

from tests.pg_cluster import free_port

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
APP_NAME = "support-tickets"  # the application_name the app's connections carry


def database_url() -> str:
    """The URL of the database this test session uses (PostgreSQL or SQLite)."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    user, password = quote(db["USER"], safe=""), quote(db["PASSWORD"], safe="")
    return f"postgres://{user}:{password}@{db['HOST']}:{db['PORT']}/{quote(db['NAME'])}"


def psycopg_conninfo(application_name: str = "support-tests") -> str:
    """A libpq connection string for a plain psycopg connection to the test database, under
    an application_name other than the app's (so it never counts as one of the app's)."""
    db = connection.settings_dict
    parts = {
        "host": db["HOST"],
        "port": db["PORT"],
        "dbname": db["NAME"],
        "user": db["USER"],
        "password": db["PASSWORD"],
        "application_name": application_name,
        "connect_timeout": 5,
    }
    return " ".join(f"{key}='{value}'" for key, value in parts.items())


def release_test_connections() -> None:
    """Close every database connection this test process holds, the pool's idle ones too.

    Its connections carry the app's application_name: a test that counts or kills the app's
    sessions must not meet its own. Async ORM calls made by earlier tests keep a connection
    checked out in asgiref's single sync thread; that one is closed from its thread. The next
    ORM call opens a new pool.
    """
    SyncToAsync.single_thread_executor.submit(lambda: connection.close()).result(timeout=10)
    connections.close_all()
    if connection.vendor == "postgresql" and hasattr(connection, "close_pool"):
        connection.close_pool()


APP_SESSIONS = """
    SELECT pid, state, wait_event_type, wait_event, query, client_port, backend_xid::text AS xid
    FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()
"""


def app_sessions(conn) -> list[dict]:
    """The app's sessions on the database ``conn`` is connected to (the test database, from
    :func:`psycopg_conninfo`).

    Inside a transaction PostgreSQL shows the activity it saw at the transaction's first look;
    the snapshot is cleared first, so a connection holding a lock sees the present too."""
    with conn.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(APP_SESSIONS, (APP_NAME,))
        columns = [column.name for column in cursor.description]
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


def tcp_port_owner(local_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` owns the TCP socket bound to ``local_port`` on this host (e.g. the
    worker behind a pg_stat_activity row's client_port), from /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in _read(table).decode().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == local_port:
                inodes.add(fields[9])
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return pid
    return None


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no output)"

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def worker_pids(self) -> list[int]:
        """The uvicorn worker processes: the server's children started by multiprocessing's
        spawn (not its resource tracker)."""
        return [pid for pid in children(self.pid) if b"spawn_main" in _read(f"/proc/{pid}/cmdline")]

    def sessions(self, conn) -> list[dict]:
        """The app's database sessions opened by this server's processes (not by the test
        process, whose connections carry the same application_name)."""
        pids = self.worker_pids() or [self.pid]
        return [s for s in app_sessions(conn) if tcp_port_owner(s["client_port"], pids)]

    def wait_for_workers(self, count: int, timeout: float = STARTUP_TIMEOUT) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            pids = self.worker_pids()
            if len(pids) == count:
                return pids
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"expected {count} workers, have {pids}\n{self.log_tail()}")
            time.sleep(0.1)

    def wait_answering(self, path: str = "/healthz", timeout: float = STARTUP_TIMEOUT) -> None:
        """Until ``path`` answers 200 (the process exiting or the timeout: an error)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.base_url}{path}", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not answer {path} within {timeout}s")
            time.sleep(0.1)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:  # the process is gone
        return b""


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (from /proc/<pid>/task/*/children)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        found += [int(p) for p in _read(f"/proc/{pid}/task/{task}/children").split()]
    return sorted(set(found))


def accepts_unix(path: str) -> bool:
    """Whether a server listens on the unix socket ``path`` (a plain socket: httpx leaks its
    own when the connection is refused)."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """terminate, wait, then kill the process group (the server and its workers)."""
    if proc.poll() is None:
        proc.terminate()
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers left behind, if any
    if proc.poll() is None:
        proc.wait(timeout=STOP_TIMEOUT)


@contextmanager
def run_uvicorn(
    *,
    workers: int = 2,
    env: dict[str, str | None] | None = None,
    python: str = sys.executable,
) -> Iterator[Server]:
    """Serve the app with ``workers`` uvicorn workers on a free loopback port; ``env`` adds to
    (or overrides) the server's environment, a ``None`` value removes that variable; without
    ``DATABASE_URL`` in it, the server uses the test session's database. ``python`` is the
    interpreter (the benchmark runs the service on another one too). Yields a
    :class:`Server` once /healthz answers."""
    port = free_port()
    server_env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": "uvicorn-under-test-" + "k" * 40,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
        "DJANGO_SECURE_SSL_REDIRECT": "0",
        "DB_POOL_MIN_SIZE": "0",
        "DB_POOL_MAX_SIZE": "8",
        "DB_POOL_TIMEOUT": "5",
        **(env or {}),
    }
    if not env or "DATABASE_URL" not in env:  # the benchmark passes its own database
        server_env["DATABASE_URL"] = database_url()
    server_env = {name: value for name, value in server_env.items() if value is not None}
    command = [
        python,
        "-m",
        "project.serve",  # the README's entry point; the test database is migrated
        "--no-migrate",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    with serve_process(command, port=port, env=server_env, workers=workers) as server:
        yield server


@contextmanager
def serve_process(
    command: list[str],
    *,
    port: int,
    env: dict[str, str],
    workers: int,
    ready_path: str = "/healthz",
    label: str = "uvicorn",
) -> Iterator[Server]:
    """Run ``command`` (a server on ``port``) in its own process group with its output in a
    log file; yields a :class:`Server` once ``ready_path`` answers and its ``workers`` are up,
    and always stops the whole group."""
    with tempfile.NamedTemporaryFile(prefix=f"{label}-", suffix=".log", delete=False) as fh:
        log_path = Path(fh.name)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole at the end
        )
    server = Server(proc=proc, port=port, log_path=log_path)
    try:
        server.wait_answering(ready_path)
        if workers > 1:
            server.wait_for_workers(workers)
        yield server
    except BaseException as exc:
        exc.add_note(f"--- {label} output (last lines of {log_path}) ---\n{server.log_tail()}")
        raise
    finally:
        stop_process(proc)
        log_path.unlink(missing_ok=True)


# --- What the README prints, and what deployment tests need ---------------------------------
def readme_block(kind: str, name: str) -> str:
    """The fenced block after ``<!-- kind: name -->`` in the README."""
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- {kind}: {name} -->\n```\w*\n(.*?)```", text, re.S)
    assert found, f"README: no block marked {kind}: {name}"
    return found.group(1)


def fill(text: str, values: dict[str, str]) -> str:
    """``text`` with each placeholder replaced, failing when one is no longer in it."""
    for placeholder, value in values.items():
        assert placeholder in text, f"{placeholder!r} is not in the README's block any more"
        text = text.replace(placeholder, value)
    return text


def self_signed_certificate(folder: Path) -> Path:
    """``folder/tls`` with fullchain.pem and privkey.pem for 127.0.0.1 and localhost, as
    deploy/'s nginx sites read them."""
    tls = folder / "tls"
    tls.mkdir()
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(tls / "privkey.pem"),
            "-out",
            str(tls / "fullchain.pem"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return tls
