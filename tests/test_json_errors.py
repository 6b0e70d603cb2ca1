"""Errors answer JSON ``{"detail": ...}`` outside the admin site, with debug on as well as off.

With debug on, Django answers an unknown path or an uncaught error with its HTML technical
pages (every URL pattern, a traceback) instead of the handlers in project/urls.py. Checked
through the ASGI app with each setting, and on a real uvicorn started with DJANGO_DEBUG=1 as
scripts/dev.sh starts it.
"""

import logging

import httpx
import pytest
from django.test import override_settings

from support import services
from tests.servers import run_uvicorn

pytestmark = pytest.mark.django_db(transaction=True)

THIRTY_DIGITS = "9" * 30


def assert_json_detail(response: httpx.Response, status: int) -> None:
    context = (response.request.method, str(response.request.url), response.text[:300])
    assert response.status_code == status, context
    assert response.headers["content-type"].startswith("application/json"), context
    assert "<html" not in response.text.lower(), context
    body = response.json()
    assert isinstance(body.get("detail"), str), context
    assert body["detail"], context


async def check_refusals(client: httpx.AsyncClient, *, is_admin: bool) -> None:
    """4xx answers, most of them given by Django itself rather than a DRF view: each JSON."""
    for method in ("GET", "POST", "DELETE"):
        assert_json_detail(await client.request(method, "/nope/"), 404)
        assert_json_detail(await client.request(method, "/api/nope/"), 404)
        assert_json_detail(await client.request(method, "/api/tickets"), 404)  # no slash
        assert_json_detail(await client.request(method, f"/api/tickets/{THIRTY_DIGITS}/"), 404)
        assert_json_detail(await client.request(method, f"/api/agents/{THIRTY_DIGITS}/"), 404)
    assert (await client.get("/nope/")).json() == {"detail": "Not found."}
    assert_json_detail(await client.get("/api/auth/token/"), 405)
    assert_json_detail(await client.put("/api/tickets/", json={}), 405 if is_admin else 401)
    if not is_admin:
        assert_json_detail(await client.get("/metrics"), 401)
    # A Host outside ALLOWED_HOSTS: Django's DisallowedHost, raised in a middleware.
    assert_json_detail(await client.get("/api/tickets/", headers={"Host": "evil.example"}), 400)


@pytest.mark.smoke
@pytest.mark.parametrize("debug", [True, False], ids=["debug", "no-debug"])
async def test_refusals_answer_json_in_every_mode(make_client, admin, debug):
    with override_settings(DEBUG=debug):
        await check_refusals(make_client(), is_admin=False)
        await check_refusals(make_client(admin.token), is_admin=True)


@pytest.mark.parametrize("debug", [True, False], ids=["debug", "no-debug"])
async def test_a_server_error_answers_json_in_every_mode(
    make_client, admin, monkeypatch, caplog, debug
):
    def broken():
        raise RuntimeError("a bug in the service")

    monkeypatch.setattr(services, "agents_with_load", broken)
    with override_settings(DEBUG=debug), caplog.at_level(logging.ERROR, "django.request"):
        response = await make_client(admin.token).get("/api/agents/")
    assert_json_detail(response, 500)
    assert response.json() == {"detail": "Internal server error."}
    assert "a bug in the service" not in response.text  # no traceback for the client
    # ... but the server's log still has it.
    logged = [r for r in caplog.records if r.name == "django.request" and r.exc_info]
    assert logged, "the error was not logged"
    assert "a bug in the service" in str(logged[0].exc_info[1])


def test_a_dev_server_with_debug_on_answers_json():
    """uvicorn with DJANGO_DEBUG=1, as scripts/dev.sh runs it. (A server error is provoked
    in-process above: the same handlers and middleware, DEBUG read per request.)"""
    with (
        run_uvicorn(workers=1, env={"DJANGO_DEBUG": "1"}) as server,
        httpx.Client(base_url=server.base_url, timeout=10) as client,
    ):
        for method in ("GET", "POST"):
            assert_json_detail(client.request(method, "/nope/"), 404)
            assert_json_detail(client.request(method, "/api/nope/"), 404)
            assert_json_detail(client.request(method, f"/api/tickets/{THIRTY_DIGITS}/"), 404)
        assert_json_detail(client.get("/api/auth/token/"), 405)
        assert_json_detail(client.get("/api/tickets/", headers={"Host": "evil.example"}), 400)
        # The admin site keeps its HTML pages.
        login = client.get("/admin/login/")
        assert login.status_code == 200
        assert login.headers["content-type"].startswith("text/html")
