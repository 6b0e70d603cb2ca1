"""Hardened authentication: expiring, revocable tokens and rate limits on logins and users."""

import os
import subprocess
import sys
import time
from datetime import timedelta

import httpx
import pytest
from django.core.cache import cache
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from django.utils import timezone

from project.env import env_rate, parse_rate
from project.settings import SUPPORT_THROTTLE_RATES as SHIPPED_RATES
from support.api import throttles
from support.models import ApiToken
from support.tokens import key_hash
from tests.conftest import PASSWORD, create_user, run_sync

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN_URL = "/api/auth/token/"
LOGOUT_URL = "/api/auth/logout/"
# each test sets the limits it is about; the failure limits are off otherwise
GENEROUS = {
    "login_failures_username_address": None,
    "login_failures_username": None,
    "login_address": "1000/min",
    "user": None,
}


@pytest.fixture(autouse=True)
def _fresh_counters(db):
    cache.clear()  # throttle counters live in the (shared, database) cache
    yield
    cache.clear()


@pytest.fixture(autouse=True)
def _steady_clock(monkeypatch):
    """Failures are counted in fixed windows: hold their clock still, in the middle of a
    15-minute window (and of the hour's first quarter), so that no test sees one end."""
    now = time.time()
    monkeypatch.setattr(throttles, "clock", lambda: now // 3600 * 3600 + 450)


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
# Failed logins are counted per (username, address) — tight — and per username from anywhere —
# loose; every attempt is counted per address. A right password is never counted.
PAIR, NAME, ADDRESS = (
    "login_failures_username_address",
    "login_failures_username",
    "login_address",
)
ATTACKER, USER_HOME = "203.0.113.7", "198.51.100.20"


@pytest.fixture
def from_address(asgi_app):
    """``from_address(ip)`` -> an anonymous client whose requests come from ``ip``."""

    def make(address: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=asgi_app, client=(address, 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://testserver")

    return make


def limits(**rates):
    return override_settings(SUPPORT_THROTTLE_RATES={**GENEROUS, **rates})


async def test_with_the_shipped_limits_an_attacker_cannot_lock_the_real_user_out(
    from_address, agent
):
    """The default limits, whatever the tests' settings say: many wrong passwords for one name
    stop the address that sends them, not the account's owner elsewhere."""
    with override_settings(SUPPORT_THROTTLE_RATES=SHIPPED_RATES):
        attacker = from_address(ATTACKER)
        codes = [
            (await _login(attacker, agent.username, f"guess-{n}")).status_code for n in range(30)
        ]
        assert codes == [400] * 5 + [429] * 25  # 5 failures per 15 minutes from one address
        assert (await _login(attacker, agent.username)).status_code == 429  # even the right one
        r = await _login(from_address(USER_HOME), agent.username)
        assert r.status_code == 200, r.text


@limits(**{PAIR: "3/15min", NAME: "50/hour"})
async def test_the_guessing_address_is_stopped_after_its_failures(from_address, agent, other_agent):
    attacker = from_address(ATTACKER)
    codes = [
        (await _login(attacker, agent.username, "wrong-password")).status_code for _ in range(4)
    ]
    assert codes == [400, 400, 400, 429]
    r = await _login(attacker, agent.username)  # the right password waits too, from there
    assert r.status_code == 429
    assert r.headers["Content-Type"] == "application/json"
    assert "detail" in r.json()
    assert r.headers["Retry-After"] == "450"  # the rest of the 15-minute window
    # the name is counted whatever its case or surrounding spaces
    assert (await _login(attacker, f" {agent.username.upper()} ")).status_code == 429
    # the owner, from elsewhere, logs in; the attacker's other names are not affected
    assert (await _login(from_address(USER_HOME), agent.username)).status_code == 200
    assert (await _login(attacker, other_agent.username)).status_code == 200


@limits(**{PAIR: "3/15min", NAME: "50/hour"})
async def test_an_ipv6_client_is_one_address_per_64_block(from_address, agent):
    """One subscriber usually holds a whole /64: rotating within it starts no new counter."""
    codes = [
        (await _login(from_address(f"2001:db8:1:2::{n:x}"), agent.username, "wrong")).status_code
        for n in range(1, 5)
    ]
    assert codes == [400, 400, 400, 429]
    assert (await _login(from_address("2001:db8:1:3::1"), agent.username)).status_code == 200


@limits(**{PAIR: "2/15min", NAME: "6/hour"})
async def test_past_the_per_username_limit_everyone_is_refused_until_it_resets(
    from_address, agent, other_agent
):
    """The bounded trade-off: guesses spread over many addresses stop at the loose limit, and
    then the account refuses every login, the owner's too, until the hour's window ends."""
    for n in range(3):  # three addresses, each within its own limit
        attacker = from_address(f"203.0.113.{n + 1}")
        codes = [(await _login(attacker, agent.username, "wrong")).status_code for _ in range(2)]
        assert codes == [400, 400]
    r = await _login(from_address(USER_HOME), agent.username)
    assert r.status_code == 429
    assert "detail" in r.json()
    assert r.headers["Retry-After"] == "3150"  # the rest of the hour's window
    assert (await _login(from_address("203.0.113.9"), agent.username, "wrong")).status_code == 429
    assert (await _login(from_address(USER_HOME), other_agent.username)).status_code == 200


@limits(**{PAIR: "3/15min", NAME: "3/hour"})
async def test_successful_logins_are_not_counted(from_address, agent):
    client = from_address(USER_HOME)
    for _ in range(8):
        assert (await _login(client, agent.username)).status_code == 200
    # a success also clears that address's failures for the name (not the name's total)
    codes = [(await _login(client, agent.username, "typo")).status_code for _ in range(2)]
    assert codes == [400, 400]
    assert (await _login(client, agent.username)).status_code == 200
    codes = [(await _login(client, agent.username, "typo")).status_code for _ in range(2)]
    assert codes == [400, 429]  # the name's 3 failures an hour: 2 before, 1 now


@limits(**{PAIR: "3/15min", NAME: "50/hour"})
async def test_unknown_usernames_are_answered_exactly_like_real_ones(from_address, agent):
    """Counting does not depend on the name existing: the answers cannot tell them apart."""
    answers = {}
    for name in (agent.username, "nobody-by-this-name"):
        client = from_address(ATTACKER)
        seen = []
        for password in ["wrong"] * 4 + [PASSWORD]:
            r = await _login(client, name, password)
            seen.append((r.status_code, r.json(), "Retry-After" in r.headers))
        answers[name] = seen
    assert answers[agent.username] == answers["nobody-by-this-name"]
    assert [status for status, _, _ in answers[agent.username]] == [400, 400, 400, 429, 429]


@limits(**{PAIR: "2/15min", NAME: "50/hour"})
async def test_counters_survive_a_flood_of_other_entries(from_address, agent):
    """Django's database cache drops a third of its entries past MAX_ENTRIES: flooding it with
    other names must not wipe a guesser's counter."""
    attacker = from_address(ATTACKER)
    for _ in range(2):
        await _login(attacker, agent.username, "wrong")
    assert (await _login(attacker, agent.username)).status_code == 429
    await run_sync(cache.set_many, {f"flood-{n}": n for n in range(400)})
    assert (await _login(attacker, agent.username)).status_code == 429


@limits(**{ADDRESS: "3/min"})
async def test_login_attempts_are_limited_per_client_address(make_client):
    users = [await run_sync(create_user) for _ in range(4)]
    client = make_client()
    answers = [(await _login(client, u.username)).status_code for u in users]
    assert answers == [200, 200, 200, 429]
    assert "Retry-After" in (await _login(client, users[0].username)).headers


async def test_forged_forwarded_for_does_not_escape_the_address_limits(make_client, agent):
    """The address is uvicorn's (from the trusted proxy only): a client's X-Forwarded-For
    header changes nothing, so it cannot reset its own counters."""
    with limits(**{ADDRESS: "2/min"}):
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
    await cache.aclear()
    with limits(**{PAIR: "2/15min"}):
        codes = []
        for n in range(3):
            r = await make_client().post(
                TOKEN_URL,
                json={"username": agent.username, "password": "x"},
                headers={"X-Forwarded-For": f"198.51.100.{n}"},
            )
            codes.append(r.status_code)
    assert codes == [400, 400, 429]


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("5/15min", (5, 900)),
        ("100/hour", (100, 3600)),
        ("120/min", (120, 60)),
        ("10/m", (10, 60)),
        ("3/2d", (3, 172800)),
        (" 7 / 30s ", (7, 30)),
    ],
)
def test_rates_read_a_count_per_period(text, parsed):
    assert parse_rate(text) == parsed


@pytest.mark.parametrize("text", ["5", "5/", "0/min", "-1/min", "5/0min", "5/fortnight", "x/min"])
def test_a_bad_rate_is_refused_at_start(text, monkeypatch):
    monkeypatch.setenv("SUPPORT_LOGIN_FAILURES_PER_USERNAME", text)
    with pytest.raises(ImproperlyConfigured, match="SUPPORT_LOGIN_FAILURES_PER_USERNAME"):
        env_rate("SUPPORT_LOGIN_FAILURES_PER_USERNAME", "100/hour")


def test_the_retired_per_username_attempt_rate_is_refused_at_start():
    """It counted every attempt, so anyone could lock an account: a deployment still setting it
    is told what replaced it rather than silently running without the limit it asked for."""
    env = {**os.environ, "SUPPORT_LOGIN_RATE_PER_USERNAME": "10/min"}
    done = subprocess.run(
        [sys.executable, "-c", "import project.settings"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "SUPPORT_LOGIN_FAILURES_PER_USERNAME" in done.stderr


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


def test_login_limits_hold_across_two_worker_processes(admin, tmp_path):
    """Counters shared by both workers, and failures counted before the password is checked:
    thirty wrong passwords sent at once, to either worker, get exactly the limit's four
    answers; the owner, from another address, still logs in."""
    from concurrent.futures import ThreadPoolExecutor

    from django.contrib.auth.hashers import PBKDF2PasswordHasher, make_password

    from tests.servers import run_uvicorn

    # the server hashes with Django's default hasher, not the tests' fast one
    password = "owner-passphrase-1"
    admin.password = make_password(password, hasher=PBKDF2PasswordHasher())
    admin.save(update_fields=["password"])
    metrics = tmp_path / "metrics"  # each worker leaves a file here: proof both served
    metrics.mkdir()
    env = {
        # day-long windows: this test's few seconds are unlikely to see one end
        "SUPPORT_LOGIN_FAILURES_PER_USERNAME_ADDRESS": "4/1d",
        "SUPPORT_LOGIN_FAILURES_PER_USERNAME": "100/1d",
        "SUPPORT_LOGIN_RATE_PER_ADDRESS": "1000/min",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics),
    }

    def attempt(base_url, password, address):
        # a new connection each time, so both workers take attempts; uvicorn believes
        # X-Forwarded-For from the loopback address (its default), here the "proxy"
        return httpx.post(
            f"{base_url}{TOKEN_URL}",
            json={"username": admin.username, "password": password},
            headers={"X-Forwarded-For": address},
            timeout=60,
        ).status_code

    with run_uvicorn(workers=2, env=env) as server:
        with ThreadPoolExecutor(max_workers=15) as pool:
            codes = list(
                pool.map(lambda n: attempt(server.base_url, f"guess-{n}", ATTACKER), range(30))
            )
        assert sorted(codes) == [400] * 4 + [429] * 26
        assert attempt(server.base_url, password, ATTACKER) == 429
        assert attempt(server.base_url, password, USER_HOME) == 200
    writers = {path.name.rsplit("_", 1)[-1] for path in metrics.iterdir()}
    assert len(writers) >= 2, f"one worker took every attempt: {writers}"
