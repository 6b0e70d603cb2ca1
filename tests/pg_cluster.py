"""A throwaway PostgreSQL cluster for the test session, from the machine's initdb and pg_ctl.

The cluster lives in a temporary folder, listens on a free loopback port and is stopped and
removed when the test process exits. As root (CI), the server runs as the ``postgres`` user,
since PostgreSQL refuses to run as root.
"""

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass


def _find_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    if candidates:
        return candidates[0]
    raise RuntimeError(f"{name} not found: install PostgreSQL server binaries (README: Tests)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Tests trade durability for speed; the benchmark passes its own settings.
TEST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}


@dataclass
class Cluster:
    datadir: str
    port: int
    user: str = "postgres"
    password: str = "postgres"
    settings: dict | None = None

    def url(self, dbname: str = "postgres") -> str:
        return f"postgres://{self.user}:{self.password}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = list(args)
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True)

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self._run(_find_bin("pg_ctl"), "-D", self.datadir, *args, check=check)

    def start(self) -> None:
        log = os.path.join(self.datadir, "server.log")
        settings = TEST_SETTINGS if self.settings is None else self.settings
        options = f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1" + "".join(
            f" -c {name}={value}" for name, value in settings.items()
        )
        self.pg_ctl("-w", "-l", log, "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-w", "-m", mode, "stop", check=False)


def start_cluster(settings: dict | None = None) -> Cluster:
    """A new cluster, started; ``settings`` replace the test settings (``-c name=value``)."""
    root = tempfile.mkdtemp(prefix="support-pg-")
    datadir = os.path.join(root, "data")
    os.mkdir(datadir)
    cluster = Cluster(datadir=datadir, port=free_port(), settings=settings)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(datadir, "postgres")
    pwfile = os.path.join(root, "pw")
    with open(pwfile, "w") as fh:
        fh.write(cluster.password)
    if os.geteuid() == 0:
        shutil.chown(pwfile, "postgres")
    cluster._run(
        _find_bin("initdb"),
        "-D",
        datadir,
        "-U",
        cluster.user,
        "--pwfile",
        pwfile,
        "-A",
        "scram-sha-256",
        "-E",
        "UTF8",
        "--no-sync",
    )
    cluster.start()

    def cleanup():
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(cleanup)
    return cluster
