"""Production as the README and the Dockerfile print it, run here for real.

- The README's recipe for a Debian host: the install block (a fresh venv from the lock file,
  in a copy of the checkout), the database block (psql on this session's PostgreSQL) and the
  systemd unit's command started with the settings file, as systemd would run it, in an
  environment holding nothing else. Only the placeholders and the host's paths are filled in,
  each of which must appear as written.
- The Dockerfile's RUN steps, CMD and HEALTHCHECK, outside Docker: the files it copies, its
  ENV, a fresh venv standing for the image's python. The two steps that change the machine
  itself (a user, a folder in /run) are the only ones not run, and are named.
- The entry point's own promises: any ``manage.py`` command works with a metrics folder that
  does not exist yet; logs are one JSON object per line in every process, uvicorn's included,
  with ISO 8601 times; one line per request, in debug too; metrics add up every worker without
  any folder given; a plain multi-worker uvicorn without one says so instead of undercounting.
"""

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import psycopg
import pytest

import tests.settings as test_settings
from tests import servers
from tests.pg_cluster import free_port
from tests.servers import ROOT, accepts_unix, database_url, fill, run_uvicorn, stop_process

DOCKERFILE = ROOT / "Dockerfile"
STARTUP = 90.0  # the start migrates a new database first
# What a service manager gives a process besides its settings.
BASE_ENV = {"PATH": f"{sys.base_prefix}/bin:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}

pytestmark = pytest.mark.django_db(transaction=True)


def readme_block(name: str) -> str:
    return servers.readme_block("production", name)


def superuser_url(dbname: str = "postgres") -> str:
    cluster = getattr(test_settings, "CLUSTER", None)
    assert cluster is not None, "needs the session's throwaway cluster (no DATABASE_URL)"
    return cluster.url(dbname)


def copy_checkout(target: Path, paths: list[str]) -> None:
    for name in paths:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def bash(script: str, cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{script}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    return done.stdout


def env_file(text: str) -> dict[str, str]:
    """NAME=value lines, quotes as systemd's EnvironmentFile reads them."""
    pairs = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            (pairs[name],) = shlex.split(value)
    return pairs


def unit_service(text: str) -> dict[str, str]:
    section, service = None, {}
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and section == "Service":
            key, _, value = line.partition("=")
            service[key] = value
    return service


def json_lines(log: str) -> list[dict]:
    """Every line of a server's output, each of which must be one JSON object."""
    lines = []
    for line in log.splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return lines


def assert_iso_time(value: str) -> None:
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, f"no time zone in {value!r}"
    assert "T" in value, value


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample in a scrape."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        metric, _, value = line.rpartition(" ")
        if metric.startswith(name + "{"):
            got = ",".join(sorted(metric[len(name) + 1 : -1].split(",")))
            if got == wanted:
                return float(value)
    return 0.0


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}: {log.read_text()[-3000:]}")
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


# --- the README's recipe ---------------------------------------------------------------------
def test_the_readmes_debian_recipe_installs_creates_the_database_and_serves(tmp_path):
    app = tmp_path / "srv-support-app"
    copy_checkout(app, ["pyproject.toml", "README.md", "manage.py", "requirements"])
    copy_checkout(app, ["project", "support"])
    clean = {**BASE_ENV, "HOME": str(tmp_path)}

    # install: a fresh venv from the lock file (as root here: no runuser to another user)
    install = fill(
        readme_block("install"),
        {"cd /srv/support/app": f"cd {app}", "runuser -u support -- ": ""},
    )
    bash(install, tmp_path, clean)
    assert (app / ".venv" / "bin" / "python").exists()

    # the database and its owner, on this session's PostgreSQL
    with psycopg.connect(superuser_url(), autocommit=True) as conn:
        taken = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'support'").fetchone()
    assert taken is None, "the test cluster must not have a database named support yet"
    database = fill(
        readme_block("database"),
        {"runuser -u postgres -- psql": f"psql '{superuser_url()}' -v ON_ERROR_STOP=1"},
    )
    bash(database, tmp_path, clean)

    # the settings file and the unit's command, as systemd runs it
    port = superuser_url().rsplit(":", 1)[1].split("/")[0]
    settings = env_file(
        fill(
            readme_block("env"),
            {
                "<50 random characters>": secrets.token_urlsafe(50),
                "localhost:5432": f"127.0.0.1:{port}",
            },
        )
    )
    unit = unit_service(readme_block("unit"))
    assert unit["EnvironmentFile"] == "/etc/support/env"
    assert unit["User"] == "support"
    assert unit["RuntimeDirectory"] == "support"
    run_dir = tmp_path / "run" / "support"  # what RuntimeDirectory=support makes
    run_dir.mkdir(parents=True)
    command = shlex.split(
        fill(unit["ExecStart"], {"/srv/support/app": str(app), "/run/support": str(run_dir)})
    )
    cwd = fill(unit["WorkingDirectory"], {"/srv/support/app": str(app)})
    socket_path = str(run_dir / "uvicorn.sock")
    assert socket_path in command
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    server_env = {**clean, **settings, "TMPDIR": str(scratch)}
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=server_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: accepts_unix(socket_path), STARTUP, "the socket", proc, log)
        # as nginx sends them: its Host, its scheme
        headers = {"Host": "tickets.example.com", "X-Forwarded-Proto": "https"}
        transport = httpx.HTTPTransport(uds=socket_path)
        with httpx.Client(base_url="http://app", transport=transport, headers=headers) as c:
            assert c.get("/readyz").status_code == 200
            # migrated by the start: the tables are there, a wrong login is a clean 400
            wrong = c.post("/api/auth/token/", json={"username": "nobody", "password": "x"})
            assert wrong.status_code == 400, wrong.text
            # an admin, as the README says after the start
            admin_env = {
                **server_env,
                "DJANGO_SUPERUSER_USERNAME": "root",
                "DJANGO_SUPERUSER_EMAIL": "root@example.com",
                "DJANGO_SUPERUSER_PASSWORD": "a-long-admin-passphrase",
            }
            bash(".venv/bin/python manage.py createsuperuser --noinput", app, admin_env)
            login = c.post(
                "/api/auth/token/",
                json={"username": "root", "password": "a-long-admin-passphrase"},
            )
            assert login.status_code == 200, login.text
            auth = {"Authorization": f"Token {login.json()['token']}"}
            sent = 40
        for _ in range(sent):  # a new connection each time, so that both workers answer
            with httpx.Client(
                base_url="http://app",
                transport=httpx.HTTPTransport(uds=socket_path),
                headers=headers,
            ) as one:
                assert one.get("/api/tickets/").status_code == 401
        for _ in range(4):  # whichever worker answers, it counts both workers' requests
            with httpx.Client(
                base_url="http://app",
                transport=httpx.HTTPTransport(uds=socket_path),
                headers=headers,
            ) as one:
                scrape = one.get("/metrics", headers=auth)
            assert scrape.status_code == 200, scrape.text
            counted = sample(
                scrape.text,
                "support_http_requests_total",
                method="GET",
                route="/api/tickets/",
                status="401",
            )
            assert counted == sent
        (metrics_dir,) = list(scratch.iterdir())  # made by the entry point for this run
        assert len({p.name.rsplit("_", 1)[1] for p in metrics_dir.glob("*.db")}) == 2
    finally:
        stop_process(proc, timeout=15)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert list(scratch.iterdir()) == [], "the run's metrics folder is left behind"
    lines = json_lines(log.read_text())
    started = [line for line in lines if line["message"].startswith("Started server process")]
    assert len(started) == 2, "two workers"
    for line in lines:
        assert_iso_time(line["time"])
    assert any(line["logger"] == "support.request" for line in lines)


# --- the Docker image's steps, outside Docker ---------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    steps = []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, rest = line.strip().partition(" ")
            steps.append((instruction, rest.strip()))
    return steps


# Steps that change the machine, not the image's files: not run here.
MACHINE_STEPS = {
    "useradd --create-home --uid 10001 app",
    "mkdir -p /run/support && chown app:app /run/support",
}


def test_the_docker_images_steps_build_and_its_command_serves(tmp_path):
    root = tmp_path / "image"
    venv = tmp_path / "python"  # stands for the image's python
    subprocess.run([f"{sys.base_prefix}/bin/python3", "-m", "venv", str(venv)], check=True)
    env = {**BASE_ENV, "HOME": str(tmp_path), "PATH": f"{venv}/bin:{BASE_ENV['PATH']}"}
    workdir, skipped, cmd, health = None, set(), None, None
    for instruction, args in dockerfile():
        if instruction == "ENV":
            for pair in shlex.split(args):
                name, _, value = pair.partition("=")
                env[name] = value
        elif instruction == "WORKDIR":
            workdir = root / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            *sources, target = args.split()
            destination = workdir / target
            for source in sources:
                path = ROOT / source
                if path.is_dir():
                    ignore = shutil.ignore_patterns("__pycache__")
                    shutil.copytree(path, destination, dirs_exist_ok=True, ignore=ignore)
                elif target.endswith("/"):  # files into a folder
                    destination.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, destination / path.name)
                else:
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, destination)
        elif instruction == "RUN":
            if args in MACHINE_STEPS:
                skipped.add(args)
                continue
            bash(args, workdir, env)
        elif instruction == "CMD":
            cmd = json.loads(args)
        elif instruction == "HEALTHCHECK":
            health = args.split(" CMD ", 1)[1]
    assert skipped == MACHINE_STEPS
    assert (workdir / "staticfiles" / "admin").is_dir(), "collectstatic ran"

    with psycopg.connect(superuser_url(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE docker_image")
    port = free_port()
    env.update(
        PORT=str(port),
        DATABASE_URL=superuser_url("docker_image"),
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS="127.0.0.1",
    )
    log = tmp_path / "cmd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:

        def healthy() -> bool:
            return subprocess.run(shlex.split(health), env=env, capture_output=True).returncode == 0

        wait_until(healthy, STARTUP, "the image's HEALTHCHECK", proc, log)
        # migrated on start; /readyz is exempt from the HTTPS redirect, like /healthz
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text
        with psycopg.connect(superuser_url("docker_image")) as conn:
            assert conn.execute("SELECT count(*) FROM support_ticket").fetchone() == (0,)
    finally:
        stop_process(proc, timeout=15)
    lines = json_lines(log.read_text())
    assert sum(line["message"].startswith("Started server process") for line in lines) == int(
        env["WEB_CONCURRENCY"]
    )


# --- the entry point's promises ------------------------------------------------------------
@pytest.mark.parametrize("command", [["--help"], ["check"], ["showmigrations", "support"]])
def test_manage_py_works_before_the_metrics_folder_exists(tmp_path, command):
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DATABASE_URL": database_url(),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "not-made-yet"),
    }
    done = subprocess.run(
        [sys.executable, "manage.py", *command], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_logs_are_json_lines_with_iso_times_and_one_line_per_request():
    probes = [uuid.uuid4().hex for _ in range(10)]
    with run_uvicorn(workers=2, env={"METRICS_PUBLIC": "1"}) as server:
        for probe in probes:
            r = httpx.get(f"{server.base_url}/api/tickets/", headers={"X-Request-ID": probe})
            assert r.status_code == 401
        for _ in range(3):
            scrape = httpx.get(f"{server.base_url}/metrics", timeout=5)
            assert scrape.status_code == 200
            counted = sample(
                scrape.text,
                "support_http_requests_total",
                method="GET",
                route="/api/tickets/",
                status="401",
            )
            assert counted == len(probes), "a scrape shows one worker's share"
        time.sleep(0.3)
        log = server.log()
    lines = json_lines(log)
    for line in lines:
        assert_iso_time(line["time"])
    uvicorn_lines = [line for line in lines if line["logger"].startswith("uvicorn")]
    assert len([line for line in uvicorn_lines if "Started server process" in line["message"]]) == 2
    for probe in probes:
        assert sum(probe in json.dumps(line) for line in lines) == 1, "one line per request"


def test_debug_logs_one_text_line_per_request():
    probe = uuid.uuid4().hex
    env = {"DJANGO_DEBUG": "1", "DJANGO_SECRET_KEY": None}
    with run_uvicorn(workers=1, env=env) as server:
        r = httpx.get(f"{server.base_url}/api/tickets/", headers={"X-Request-ID": probe})
        assert r.status_code == 401
        time.sleep(0.3)
        log = server.log()
    mine = [line for line in log.splitlines() if probe in line]
    assert len(mine) == 1, mine
    assert_iso_time(mine[0].split(" ", 1)[0])


def test_plain_uvicorn_with_workers_and_no_metrics_folder_says_so(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": "k" * 50,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
        "DJANGO_SECURE_SSL_REDIRECT": "0",
        "DATABASE_URL": database_url(),
        "METRICS_PUBLIC": "1",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp_path / "uvicorn.log"
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "project.asgi:application",
        "--port",
        str(port),
        "--workers",
        "2",
        "--lifespan",
        "off",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:

        def answers():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
            except httpx.TransportError:
                return None

        scrape = wait_until(answers, 30, "uvicorn", proc, log)
        assert scrape.status_code == 503
        assert scrape.headers["content-type"] == "application/json"
        assert "project.serve" in scrape.json()["detail"]
    finally:
        stop_process(proc, timeout=15)


def test_a_second_server_is_refused_the_metrics_folder_of_a_running_one(tmp_path):
    folder = tmp_path / "metrics"
    with run_uvicorn(workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(folder)}) as server:
        assert httpx.get(f"{server.base_url}/api/tickets/").status_code == 401
        samples = sorted(p.name for p in folder.glob("*.db"))
        assert samples
        env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": str(folder),
            "DATABASE_URL": database_url(),
        }
        command = [
            sys.executable,
            "-m",
            "project.serve",
            "--no-migrate",
            "--workers",
            "2",
            "--port",
            str(free_port()),
        ]
        second = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert second.returncode != 0
        assert "another server" in second.stderr
        assert sorted(p.name for p in folder.glob("*.db")) == samples, "the first one's samples"


def test_a_bad_setting_stops_the_start_with_one_json_line():
    env = {**os.environ, "LOG_FORMAT": "xml", "DATABASE_URL": database_url()}
    done = subprocess.run(
        [sys.executable, "-m", "project.serve", "--no-migrate"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    (line,) = json_lines(done.stderr)
    assert "LOG_FORMAT" in line["message"]
