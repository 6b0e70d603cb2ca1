"""PgBouncer for the tests and the benchmark: ``deploy/pgbouncer.ini`` as is, on a local cluster.

``run_pgbouncer(databases={...}, userlist=..., settings={...})`` writes the repository's
config with its ``[databases]`` section replaced and the given ``[pgbouncer]`` keys' values
replaced (each key must be in the file exactly once: a test cannot quietly run another
config than the one deployed), starts Debian's pgbouncer in the foreground on a free
loopback port, waits until its console answers, and always stops it (SIGTERM, then a kill of
its process group). As root it runs as the ``postgres`` user (``user = postgres``, the one
key it adds): PgBouncer refuses to run as root.

    with run_pgbouncer(
        databases={"app": "host=127.0.0.1 port=5432 dbname=app"},
        userlist=['"app" "SCRAM-SHA-256$4096:..."'],
        settings={"default_pool_size": "4"},
    ) as bouncer:
        bouncer.dsn("app", user="app", password="...")  # what DATABASE_URL points at
        bouncer.console("SHOW POOLS")                    # rows as dicts
"""

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg

from tests.pg_cluster import free_port
from tests.servers import ROOT, children, stop_process

CONFIG = ROOT / "deploy" / "pgbouncer.ini"
STARTUP_TIMEOUT = 15.0
# The console's user, in the userlist with a password of its own (admin_users in the config).
ADMIN_USER = "pgbouncer_admin"


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.access(found, os.X_OK):
        raise RuntimeError("pgbouncer not found: install Debian's pgbouncer (scripts/test.sh)")
    return found


def render_config(template: str, *, databases: dict[str, str], settings: dict[str, str]) -> str:
    """The config with ``[databases]`` holding exactly ``databases`` and each key of
    ``settings`` given that value in ``[pgbouncer]`` (where it must appear exactly once)."""
    head, found, rest = template.partition("[databases]\n")
    body, found_too, tail = rest.partition("\n[pgbouncer]\n")
    assert found, f"{CONFIG}: no [databases] section"
    assert found_too, f"{CONFIG}: no [pgbouncer] section after [databases]"
    comments = [line for line in body.splitlines() if line.startswith(";")]
    entries = [f"{name} = {spec}" for name, spec in databases.items()]
    text = head + "[databases]\n" + "\n".join([*comments, *entries]) + "\n\n[pgbouncer]\n" + tail
    for key, value in settings.items():
        pattern = re.compile(rf"^{re.escape(key)} = .*$", re.M)
        matches = pattern.findall(text)
        assert len(matches) == 1, f"{key} must appear exactly once in {CONFIG}, found {matches}"
        line = f"{key} = {value}"
        text = pattern.sub(lambda _, line=line: line, text)
    return text


@dataclass
class PgBouncer:
    proc: subprocess.Popen
    folder: Path
    port: int
    admin_password: str
    host: str = "127.0.0.1"

    @property
    def log_path(self) -> Path:
        return self.folder / "pgbouncer.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"

    @property
    def pid(self) -> int:
        """The pgbouncer process (itself, or its child when started through runuser)."""
        kids = children(self.proc.pid)
        return kids[0] if kids else self.proc.pid

    def url(self, dbname: str, *, user: str, password: str) -> str:
        """A postgres:// URL through PgBouncer (for DATABASE_URL)."""
        return (
            f"postgres://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{self.host}:{self.port}/{quote(dbname, safe='')}"
        )

    def dsn(self, dbname: str, *, user: str, password: str, **extra) -> str:
        """A libpq connection string through PgBouncer (for psycopg.connect)."""
        parts = {
            "host": self.host,
            "port": self.port,
            "dbname": dbname,
            "user": user,
            "password": password,
            "connect_timeout": 5,
            **extra,
        }
        return " ".join(f"{key}='{value}'" for key, value in parts.items())

    def console(self, command: str) -> list[dict]:
        """Run a console command (``SHOW POOLS``, ``SHOW STATS``...): its rows as dicts. The
        console speaks the simple query protocol only, which psycopg's ClientCursor uses."""
        dsn = self.dsn("pgbouncer", user=ADMIN_USER, password=self.admin_password)
        with (
            psycopg.connect(dsn, autocommit=True, cursor_factory=psycopg.ClientCursor) as conn,
            conn.cursor() as cursor,
        ):
            cursor.execute(command)
            if cursor.description is None:
                return []
            names = [column.name for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


@contextmanager
def run_pgbouncer(
    *,
    databases: dict[str, str],
    userlist: list[str] | None = None,
    userlist_file: Path | None = None,
    settings: dict[str, str] | None = None,
    admin_password: str | None = None,
) -> Iterator[PgBouncer]:
    """Run deploy/pgbouncer.ini with ``databases`` (name -> connection spec) and ``settings``
    (``[pgbouncer]`` key -> value) on a free loopback port. The userlist is ``userlist``
    (lines as the file holds them) and/or the file ``userlist_file`` (the README's recipe
    makes one). The console user (ADMIN_USER) is added with a fresh password, unless
    ``admin_password`` says the userlist already has it with that one."""
    folder = Path(tempfile.mkdtemp(prefix="support-pgbouncer-"))
    lines = list(userlist or [])
    if userlist_file is not None:
        lines += userlist_file.read_text().splitlines()
    if admin_password is None:
        admin_password = os.urandom(12).hex()
        lines.append(f'"{ADMIN_USER}" "{admin_password}"')
    auth_file = folder / "userlist.txt"
    auth_file.write_text("\n".join(lines) + "\n")
    auth_file.chmod(0o600)
    port = free_port()
    values = {
        "listen_addr": "127.0.0.1",
        "listen_port": str(port),
        "unix_socket_dir": str(folder),
        "logfile": str(folder / "pgbouncer.log"),
        "pidfile": str(folder / "pgbouncer.pid"),
        "auth_file": str(auth_file),
        **(settings or {}),
    }
    config = render_config(CONFIG.read_text(), databases=databases, settings=values)
    command = [pgbouncer_binary(), str(folder / "pgbouncer.ini")]
    if os.geteuid() == 0:
        config += "\nuser = postgres\n"  # it refuses to run as root
        command = ["runuser", "-u", "postgres", "--", *command]
    (folder / "pgbouncer.ini").write_text(config)
    if os.geteuid() == 0:
        for path in (folder, *folder.iterdir()):
            shutil.chown(path, "postgres")
    stdout = folder / "stdout.log"
    with open(stdout, "wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=folder,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    bouncer = PgBouncer(proc=proc, folder=folder, port=port, admin_password=admin_password)
    try:
        _wait_ready(bouncer, stdout)
        yield bouncer
    except BaseException as exc:
        exc.add_note(f"--- pgbouncer log ({bouncer.log_path}) ---\n{_tail(bouncer.log())}")
        raise
    finally:
        stop_process(proc)
        shutil.rmtree(folder, ignore_errors=True)


def _wait_ready(bouncer: PgBouncer, stdout: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if bouncer.proc.poll() is not None:
            raise RuntimeError(
                f"pgbouncer exited with {bouncer.proc.returncode}:\n"
                f"{_tail(stdout.read_text(errors='replace'))}\n{_tail(bouncer.log())}"
            )
        with socket.socket() as probe, suppress(OSError):
            probe.settimeout(1)
            probe.connect((bouncer.host, bouncer.port))
            with suppress(psycopg.OperationalError):
                bouncer.console("SHOW VERSION")
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"pgbouncer did not answer within {STARTUP_TIMEOUT}s")
        time.sleep(0.1)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])
