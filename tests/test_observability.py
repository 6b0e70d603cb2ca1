"""Health endpoints, request ids, structured logs without secrets, and Prometheus metrics
(single process here, and added up across two real uvicorn workers)."""

import io
import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import httpx
import pytest
from django.test import override_settings

from support.observability import RequestIdFilter
from tests.conftest import create_tickets, run_sync
from tests.servers import run_uvicorn

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent


# --- health ---------------------------------------------------------------------------------
@pytest.mark.smoke
async def test_readyz_answers_200_when_the_database_does(make_client):
    r = await make_client().get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


_PROBE = textwrap.dedent(
    """
    import asyncio, json, time
    import httpx
    from project.asgi import application

    async def main():
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            out = {}
            for path in ("/healthz", "/readyz"):
                start = time.monotonic()
                r = await c.get(path)
                out[path] = {"status": r.status_code, "body": r.json(),
                             "seconds": time.monotonic() - start}
            print(json.dumps(out))

    asyncio.run(main())
    """
)


def test_readyz_says_503_with_a_reason_when_the_database_is_down_and_healthz_200():
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": "s" * 50,
        "DATABASE_URL": "postgres://nobody:nothing@127.0.0.1:9/none",
        "DB_POOL_MIN_SIZE": "0",
        "READYZ_TIMEOUT": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["/healthz"]["status"] == 200
    ready = out["/readyz"]
    assert ready["status"] == 503
    assert ready["body"]["status"] == "unavailable"
    assert ready["body"]["reason"].startswith("database")
    assert ready["seconds"] < 1 + 1.5  # READYZ_TIMEOUT plus slack: never the pool's 5 s


# --- request ids and logs -------------------------------------------------------------------
@pytest.fixture
def log_lines():
    """What the configured console handler writes, as parsed JSON lines, at DEBUG level."""
    handler = next(
        h
        for h in logging.getLogger().handlers
        if any(isinstance(f, RequestIdFilter) for f in h.filters)
    )
    buffer = io.StringIO()
    old_stream = handler.setStream(buffer)
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG)

    def lines():
        return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]

    lines.raw = buffer.getvalue
    yield lines
    root.setLevel(old_level)
    handler.setStream(old_stream)


@pytest.mark.smoke
async def test_one_json_access_line_per_request_with_the_request_id(agent_client, admin, log_lines):
    await run_sync(create_tickets, admin, 3)
    r = await agent_client.get("/api/agent/tickets/", headers={"X-Request-ID": "abc-123"})
    assert r.headers["X-Request-ID"] == "abc-123"
    access = [line for line in log_lines() if line["logger"] == "support.request"]
    assert len(access) == 1
    line = access[0]
    assert line["method"] == "GET"
    assert line["route"] == "/api/agent/tickets/"
    assert line["status"] == 200
    assert line["request_id"] == "abc-123"
    assert line["duration_ms"] > 0
    assert {"time", "level", "message"} <= set(line)
    # the application event of the same request carries the same id
    events = [line for line in log_lines() if line["logger"] == "support.events"]
    assert [e["message"] for e in events] == ["tickets assigned by fetch"]
    assert events[0]["request_id"] == "abc-123"
    assert len(events[0]["ticket_ids"]) == 3


async def test_request_id_is_generated_when_absent_or_unsafe(make_client, log_lines):
    client = make_client()
    for given in (None, "has spaces", "x" * 200, "semi;colon"):
        headers = {"X-Request-ID": given} if given else {}
        r = await client.get("/api/tickets/", headers=headers)
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-ID"]), given
    routes = {line["route"] for line in log_lines() if line["logger"] == "support.request"}
    assert routes == {"/api/tickets/"}


async def test_refusal_at_the_cap_is_logged_as_an_event(admin_client, admin, agent, log_lines):
    tickets = await run_sync(create_tickets, admin, 2)
    with override_settings(SUPPORT_AGENT_MAX_TICKETS=1):
        await admin_client.patch(f"/api/tickets/{tickets[0].pk}/", json={"assigned_to": agent.pk})
        r = await admin_client.patch(
            f"/api/tickets/{tickets[1].pk}/",
            json={"assigned_to": agent.pk},
            headers={"X-Request-ID": "cap-1"},
        )
    assert r.status_code == 409
    refused = [line for line in log_lines() if line["message"] == "assignment refused at the cap"]
    assert len(refused) == 1
    assert refused[0]["request_id"] == "cap-1"
    assert refused[0]["agent_id"] == agent.pk


async def test_no_token_or_password_ever_reaches_a_log_line(make_client, admin, log_lines):
    password = "Sup3r-secret-passphrase"

    def set_password():
        admin.set_password(password)
        admin.save()

    await run_sync(set_password)
    client = make_client()
    r = await client.post(
        "/api/auth/token/", json={"username": admin.username, "password": password}
    )
    token = r.json()["token"]
    await client.post("/api/auth/token/", json={"username": admin.username, "password": "wrong-1"})
    authed = make_client(token)
    agent_password = "An0ther-long-passphrase"
    await authed.post("/api/agents/", json={"username": "newbie", "password": agent_password})
    await authed.get(f"/api/tickets/?search={token}")
    await make_client("f" * 40).get("/api/tickets/")  # a bad token
    await authed.post(
        "/api/tickets/", content=b"{broken", headers={"Content-Type": "application/json"}
    )
    text = log_lines.raw()
    assert text.count('"logger": "support.request"') >= 6
    for secret in (password, token, agent_password, "wrong-1", "f" * 40):
        assert secret not in text


# --- metrics --------------------------------------------------------------------------------
def _sample(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.smoke
async def test_metrics_count_requests_top_ups_and_open_tickets(admin_client, agent_client, admin):
    await run_sync(create_tickets, admin, 20)
    before = (await admin_client.get("/metrics")).text
    await agent_client.get("/api/agent/tickets/")
    await agent_client.get("/api/agent/tickets/")  # nothing to take
    r = await admin_client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    after = r.text
    route = {"route": "/api/agent/tickets/", "method": "GET", "status": "200"}
    grew = _sample(after, "support_http_requests_total", **route) - _sample(
        before, "support_http_requests_total", **route
    )
    assert grew == 2
    assert (
        _sample(after, "support_topup_assigned_tickets_sum")
        - _sample(before, "support_topup_assigned_tickets_sum")
        == 15
    )
    assert _sample(after, "support_open_tickets") == 5
    assert "support_http_request_duration_seconds_bucket" in after
    assert "support_agent_lock_wait_seconds_count" in after


async def test_pool_empty_and_cap_refusals_are_counted(admin_client, agent_client, admin, agent):
    before = (await admin_client.get("/metrics")).text
    await agent_client.get("/api/agent/tickets/")  # the pool is empty
    [ticket] = await run_sync(create_tickets, admin, 1)
    with override_settings(SUPPORT_AGENT_MAX_TICKETS=0):
        await admin_client.patch(f"/api/tickets/{ticket.pk}/", json={"assigned_to": agent.pk})
    after = (await admin_client.get("/metrics")).text
    for name in ("support_topup_pool_empty_total", "support_cap_refusals_total"):
        assert _sample(after, name) - _sample(before, name) == 1, name


async def test_who_may_read_metrics_is_configurable(make_client, admin_client, agent_client):
    assert (await admin_client.get("/metrics")).status_code == 200
    assert (await agent_client.get("/metrics")).status_code == 403
    assert (await make_client().get("/metrics")).status_code in (401, 403)
    with override_settings(METRICS_PUBLIC=True):
        assert (await make_client().get("/metrics")).status_code == 200
    with override_settings(METRICS_TOKEN="scrape-me"):
        client = make_client()
        ok = await client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
        assert ok.status_code == 200
        bad = await client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert bad.status_code in (401, 403)
        assert (await admin_client.get("/metrics")).status_code == 403  # only the token


def test_metrics_add_up_across_two_uvicorn_workers():
    """Requests spread over two worker processes; every scrape, whichever worker answers it,
    counts all of them (prometheus-client's multiprocess mode)."""
    with tempfile.TemporaryDirectory() as metrics_dir:
        env = {"PROMETHEUS_MULTIPROC_DIR": metrics_dir, "METRICS_PUBLIC": "1"}
        with run_uvicorn(workers=2, env=env) as server:
            base = server.base_url
            sent = 60
            for _ in range(sent):  # a new connection each time: both workers take some
                assert httpx.get(f"{base}/api/tickets/", timeout=5).status_code == 401
            writers = {name.split("_")[-1] for name in os.listdir(metrics_dir)}
            assert len(writers) >= 2, f"one worker took every request: {writers}"
            for _ in range(6):
                text = httpx.get(f"{base}/metrics", timeout=5).text
                counted = _sample(
                    text, "support_http_requests_total", route="/api/tickets/", status="401"
                )
                assert counted == sent


def test_the_service_leaves_the_process_wide_random_alone():
    """Request ids and background timing draw from generators of their own: a background
    thread's draw moved the process-wide state under Hypothesis' feet mid-example (the fuzz
    test's 'random inside strategies' failures), and a seeded program keeps its sequence."""
    from django.test import RequestFactory

    from support import housekeeping, observability

    state = random.getstate()
    observability._request_id(RequestFactory().get("/"))
    housekeeping._later(1.0)
    assert random.getstate() == state
