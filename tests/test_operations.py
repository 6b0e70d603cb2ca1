"""Running it: production settings pass Django's deploy checks, an unreachable database answers
503 quickly, and the hot paths' query counts stay fixed."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support import services
from tests.conftest import create_tickets

ROOT = Path(__file__).resolve().parent.parent
PROD_ENV = {
    "DJANGO_DEBUG": "0",
    "DJANGO_SECRET_KEY": "x" * 20 + "-production-like-secret-key-for-the-deploy-check-0123456789",
    "DJANGO_ALLOWED_HOSTS": "tickets.example.com",
}


def _run(args, env, timeout=60):
    full_env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    full_env.update(env)
    return subprocess.run(
        args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.smoke
def test_deploy_check_passes_with_production_settings(tmp_path):
    env = {**PROD_ENV, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"}
    result = _run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.smoke
def test_deploy_check_still_sees_through_the_middleware_subclasses(tmp_path):
    """MIDDLEWARE lists subclasses of Django's middleware; Django's own deploy checks (HSTS, SSL
    redirect, ...) must still run on them."""
    env = {
        **PROD_ENV,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "DJANGO_SECURE_HSTS_SECONDS": "0",
        "DJANGO_SECURE_SSL_REDIRECT": "0",
    }
    result = _run([sys.executable, "manage.py", "check", "--deploy"], env)
    assert "security.W004" in result.stderr, result.stderr
    assert "security.W008" in result.stderr, result.stderr
    assert "security.W001" not in result.stderr  # the subclass is installed


def test_production_settings_refuse_to_start_without_a_secret_key(tmp_path):
    env = {"DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": "", "DATABASE_URL": "sqlite:///x.db"}
    result = _run([sys.executable, "manage.py", "check"], env)
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY" in result.stderr


_PROBE = textwrap.dedent(
    """
    import asyncio, json, time
    import httpx
    from project.asgi import application

    async def main():
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            start = time.monotonic()
            r = await c.get("/api/agent/tickets/", headers={"Authorization": "Token abc"})
            print(json.dumps({"status": r.status_code, "body": r.json(),
                              "retry_after": r.headers.get("retry-after"),
                              "seconds": time.monotonic() - start}))

    asyncio.run(main())
    """
)


def test_unreachable_database_answers_503_within_the_pool_timeout(tmp_path):
    # A port nobody listens on: connections are refused, the pool gives up after its timeout.
    env = {
        **PROD_ENV,
        "DJANGO_ALLOWED_HOSTS": "localhost",
        "DJANGO_SECURE_SSL_REDIRECT": "0",
        "DATABASE_URL": "postgres://nobody:nothing@127.0.0.1:9/none",
        "DB_POOL_TIMEOUT": "1.5",
        "DB_POOL_MIN_SIZE": "0",
    }
    result = _run([sys.executable, "-c", _PROBE], env)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["status"] == 503
    assert "database" in answer["body"]["detail"]
    assert answer["retry_after"] == "1"
    assert answer["seconds"] < 1.5 + 2.0  # the pool timeout, plus start-up slack; never a hang


# --- Query counts of the hot paths (a regression here fails CI; timings live in bench/) -----
@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
def test_top_up_poll_and_transition_query_counts(django_assert_num_queries, admin, agent):
    create_tickets(admin, 40)
    # BEGIN, lock the agent row, its role (read after the lock), read what it holds (nothing),
    # pick from the pool, give them to the agent, record the assignments, the events, COMMIT
    with django_assert_num_queries(9):
        rows = services.tickets_top_up(agent_id=agent.pk)
    assert len(rows) == 15
    # a poll with nothing to take: BEGIN, lock, role, what it holds, COMMIT (the API answers an
    # agent at the cap without the transaction: tests/test_hot_paths.py)
    with django_assert_num_queries(5):
        assert services.tickets_top_up(agent_id=agent.pk) == rows
    # BEGIN, lock the agent row, its role, lock the ticket (its holder is on the row), update
    # it, record, COMMIT
    with django_assert_num_queries(7):
        services.ticket_transition_by_agent(
            agent_id=agent.pk, ticket_id=rows[0]["id"], to_status="resolved"
        )


@pytest.mark.smoke
async def test_healthz_answers_from_the_process_without_host_check(make_client):
    client = make_client()
    client.headers["Host"] = "not-an-allowed-host.example"
    r = await client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
