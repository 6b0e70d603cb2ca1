"""Hardened authentication: expiring, revocable tokens and rate limits on logins and users."""

from datetime import timedelta

import pytest
from django.core.cache import cache
from django.test import override_settings
from django.utils import timezone

from support.models import ApiToken
from support.tokens import key_hash
from tests.conftest import PASSWORD, create_user, run_sync

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN_URL = "/api/auth/token/"
LOGOUT_URL = "/api/auth/logout/"
GENEROUS = {"login_username": "1000/min", "login_address": "1000/min", "user": None}


@pytest.fixture(autouse=True)
def _fresh_counters(db):
    cache.clear()  # throttle counters live in the (shared, database) cache
    yield
    cache.clear()


async def _login(client, username, password=PASSWORD):
    return await client.post(TOKEN_URL, json={"username": username, "password": password})


# --- tokens ---------------------------------------------------------------------------------
@pytest.mark.smoke
async def test_logout_revokes_only_the_token_it_was_made_with(make_client, agent):
    other = (await _login(make_client(), agent.username)).json()["token"]
    client = make_client(agent.token)
    r = await client.post(LOGOUT_URL)
    assert r.status_code == 204
    assert (await client.get("/api/agent/tickets/")).status_code == 401
    assert not await ApiToken.objects.filter(key_hash=key_hash(agent.token)).aexists()
    assert (await make_client(other).get("/api/agent/tickets/")).status_code == 200


async def test_logout_without_credentials_is_401(make_client):
    r = await make_client().post(LOGOUT_URL)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == "Token"


async def test_tokens_expire_after_their_lifetime(make_client, agent):
    with override_settings(SUPPORT_TOKEN_TTL_SECONDS=60):
        key = (await _login(make_client(), agent.username)).json()["token"]
    token = await ApiToken.objects.aget(key_hash=key_hash(key))
    lifetime = token.expires_at - token.created_at
    assert lifetime == timedelta(seconds=60)
    assert (await make_client(key).get("/api/agent/tickets/")).status_code == 200

    await ApiToken.objects.filter(pk=token.pk).aupdate(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    r = await make_client(key).get("/api/agent/tickets/")
    assert r.status_code == 401
    assert "expired" in r.json()["detail"]


# --- login throttling -----------------------------------------------------------------------
@override_settings(SUPPORT_THROTTLE_RATES={**GENEROUS, "login_username": "3/min"})
async def test_login_attempts_are_limited_per_username(make_client, agent, other_agent):
    clients = [make_client() for _ in range(4)]  # the address limit is not what stops them
    answers = [(await _login(c, agent.username, "wrong-password")).status_code for c in clients]
    assert answers == [400, 400, 400, 429]
    # even the right password waits now ...
    r = await _login(make_client(), agent.username)
    assert r.status_code == 429
    assert 0 < int(r.headers["Retry-After"]) <= 60
    # ... the name is counted whatever its case, and other users are not affected
    assert (await _login(make_client(), agent.username.upper())).status_code == 429
    assert (await _login(make_client(), other_agent.username)).status_code == 200


@override_settings(SUPPORT_THROTTLE_RATES={**GENEROUS, "login_address": "3/min"})
async def test_login_attempts_are_limited_per_client_address(make_client):
    users = [await run_sync(create_user) for _ in range(4)]
    client = make_client()
    answers = [(await _login(client, u.username)).status_code for u in users]
    assert answers == [200, 200, 200, 429]
    assert "Retry-After" in (await _login(client, users[0].username)).headers


async def test_forged_forwarded_for_does_not_escape_the_address_limit(make_client, agent):
    """The address is uvicorn's (from the trusted proxy only): a client's X-Forwarded-For
    header changes nothing, so it cannot reset its own counter."""
    with override_settings(SUPPORT_THROTTLE_RATES={**GENEROUS, "login_address": "2/min"}):
        client = make_client()
        codes = []
        for n in range(3):
            r = await client.post(
                TOKEN_URL,
                json={"username": f"nobody{n}", "password": "x"},
                headers={"X-Forwarded-For": f"198.51.100.{n}"},
            )
            codes.append(r.status_code)
    assert codes == [400, 400, 429]


# --- per-user request rate ------------------------------------------------------------------
async def test_per_user_request_rate_is_configurable(make_client, agent, other_agent):
    client = make_client(agent.token)
    for _ in range(6):  # off by default
        assert (await client.get("/api/agent/tickets/")).status_code == 200
    await cache.aclear()
    with override_settings(SUPPORT_THROTTLE_RATES={**GENEROUS, "user": "5/min"}):
        codes = [(await client.get("/api/agent/tickets/")).status_code for _ in range(6)]
        assert codes == [200] * 5 + [429]
        assert (await make_client(other_agent.token).get("/api/agent/tickets/")).status_code == 200


def test_login_limit_holds_across_two_worker_processes(admin, tmp_path):
    """With per-process counters two workers would let through twice the limit."""
    import httpx

    from tests.servers import run_uvicorn

    metrics = tmp_path / "metrics"  # each worker leaves a file here: proof both served
    metrics.mkdir()
    env = {
        "SUPPORT_LOGIN_RATE_PER_USERNAME": "4/min",
        "SUPPORT_LOGIN_RATE_PER_ADDRESS": "1000/min",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics),
    }
    with run_uvicorn(workers=2, env=env) as server:
        codes = [
            # a new connection each time, so both workers take attempts
            httpx.post(
                f"{server.base_url}{TOKEN_URL}",
                json={"username": admin.username, "password": "wrong-password"},
                timeout=10,
            ).status_code
            for _ in range(30)
        ]
    assert codes == [400] * 4 + [429] * 26
    writers = {path.name.rsplit("_", 1)[-1] for path in metrics.iterdir()}
    assert len(writers) >= 2, f"one worker took every attempt: {writers}"
