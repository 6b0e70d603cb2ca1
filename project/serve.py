"""Run the service: ``python -m project.serve`` (README: Production).

One entry point, so that nothing depends on the order of a recipe's steps:

1. the settings are read (a bad value stops here, before anything runs);
2. migrations run, in a process of their own without a statement timeout (an index build may
   take long), unless ``--no-migrate``; through PgBouncer (``DB_POOLER=pgbouncer``) on the
   direct connection, and then the role's timeouts are read through PgBouncer: a start whose
   role disagrees with the settings stops here (project/pooler.py);
3. the metrics folder is made ready: with several workers each one writes its samples to a
   folder they share and every scrape adds them all up (prometheus-client's multiprocess mode);
   without one, each scrape would show one worker's share. ``PROMETHEUS_MULTIPROC_DIR`` names
   it; unset, a private folder is made for this run and removed at exit. An earlier run's
   samples are deleted first, and a second server given the same folder is refused (a lock);
4. uvicorn serves ``project.asgi:application`` with the service's logging set in every process
   before it loads the app (uvicorn's lines too, as JSON), one access line per request
   (uvicorn's own access log off), forwarded headers from ``FORWARDED_ALLOW_IPS`` only, no
   lifespan protocol (the app has none), and 20 s for requests under way at a stop.

SIGTERM stops it at any step, the migration included (also as PID 1 in a container).

``--workers`` defaults to ``$WEB_CONCURRENCY`` (else 1), ``--port`` to ``$PORT`` (else 8000).
"""

import argparse
import fcntl
import glob
import json
import logging
import logging.config
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

APP = "project.asgi:application"
# prometheus-client's files in multiprocess mode: the only ones deleted from the folder.
SAMPLE_FILES = ("counter_*.db", "gauge_*.db", "histogram_*.db", "summary_*.db")
log = logging.getLogger("support.serve")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m project.serve", description=__doc__.split("\n")[0]
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--uds", help="serve on this unix socket (behind nginx)")
    where.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WEB_CONCURRENCY", "1")))
    parser.add_argument("--no-migrate", dest="migrate", action="store_false")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def _migrate(settings) -> None:
    """``migrate`` in a process of its own; its output becomes one log record. Through
    PgBouncer it runs on the direct connection instead (SUPPORT_LISTEN_DATABASE_URL): its
    statement timeout must be off, which only a session of its own can say."""
    env = {**os.environ, "DB_STATEMENT_TIMEOUT_MS": "0"}
    if settings.DB_POOLER == "pgbouncer":
        env.update(DATABASE_URL=settings.SUPPORT_LISTEN_DATABASE_URL, DB_POOLER="none")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # its metrics are not the server's
    command = [sys.executable, "-m", "django", "migrate", "--noinput"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)  # noqa: S603
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        log.error("migrations failed", extra={"output": output})
        raise SystemExit(done.returncode)
    applied = [line.split()[1].rstrip(".") for line in output.splitlines() if "Applying" in line]
    log.info("migrations done", extra={"applied": applied})


def _check_pooler(settings) -> None:
    """Through PgBouncer the timeouts are the role's (project/pooler.py): a start whose role
    says otherwise than DB_LOCK_TIMEOUT_MS / DB_STATEMENT_TIMEOUT_MS, or that cannot read them,
    stops here (as a start whose migrations fail does)."""
    if settings.DB_POOLER != "pgbouncer":
        return
    from project import pooler

    problems = pooler.session_settings_problems()
    if problems:
        log.critical(
            "the database sessions behind the pooler do not have the service's timeouts",
            extra={"problems": problems, "fix": pooler.fix_sql(), "then": "RECONNECT"},
        )
        raise SystemExit(2)
    log.info("pooler: session settings verified", extra=pooler.expected_session_settings())


def _metrics_folder(workers: int) -> tuple[str | None, object]:
    """Make PROMETHEUS_MULTIPROC_DIR ready: (a folder made for this run, to remove; the lock
    that keeps a second server from sharing the folder, held while this one runs)."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not given:
        if workers == 1:
            return None, None  # one process: its own registry is the whole picture
        given = tempfile.mkdtemp(prefix="support-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = given
        made = given
    else:
        os.makedirs(given, exist_ok=True)
        made = None
    lock = open(os.path.join(given, ".serve.lock"), "w")  # noqa: SIM115 (held until exit)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"{given}: another server's workers write their metrics there") from None
    for pattern in SAMPLE_FILES:  # a previous run's samples
        for stale in glob.glob(os.path.join(given, pattern)):
            os.remove(stale)
    return made, lock


def _clear_stale_socket(path: str) -> None:
    """A socket file left by a server that died is removed; a live one stops the start."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.remove(path)
    else:
        raise SystemExit(f"{path}: another server is listening there")
    finally:
        probe.close()


def _stop_on_sigterm() -> None:
    """Until uvicorn takes over its signals: SIGTERM ends the start (and the migration under
    way), also as PID 1 in a container, where an unhandled SIGTERM is ignored."""

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def _settings():
    try:
        from django.conf import settings

        settings.LOGGING  # noqa: B018 (reads and checks every setting)
    except Exception as exc:  # no logging yet: say it as one JSON line
        print(
            json.dumps(
                {"level": "CRITICAL", "logger": "support.serve", "message": f"settings: {exc}"}
            ),
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    return settings


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    settings = _settings()
    logging.config.dictConfig(settings.LOGGING)
    logging.captureWarnings(True)
    sys.excepthook = lambda *exc_info: log.critical("start failed", exc_info=exc_info)
    _stop_on_sigterm()
    if args.migrate:
        _migrate(settings)
    _check_pooler(settings)
    made, _lock = _metrics_folder(args.workers)
    if args.uds:
        _clear_stale_socket(args.uds)
    import uvicorn

    try:
        uvicorn.run(
            APP,
            uds=args.uds,
            host=args.host,
            port=args.port,
            workers=args.workers,
            lifespan="off",
            proxy_headers=True,  # from FORWARDED_ALLOW_IPS only (uvicorn's default: 127.0.0.1)
            access_log=False,  # support.request writes one line per request
            # the service's logging in every process, set before a worker loads the app
            log_config=settings.LOGGING,
            timeout_graceful_shutdown=20,
        )
    finally:
        if made:
            shutil.rmtree(made, ignore_errors=True)


if __name__ == "__main__":
    main()
