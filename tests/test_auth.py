"""Authentication and roles: the token login, 401 for missing or bad credentials, the role
matrix over every API route, admins who are also agents, and session auth for the browsable API.
"""

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import httpx
import pytest
from django.urls import reverse
from django.utils import timezone

from support import services
from support.api.urls import urlpatterns
from support.models import ApiToken as Token
from support.models import Ticket, TicketAssignment
from support.tokens import key_hash, token_issue
from tests.conftest import PASSWORD, create_held, create_tickets, create_user, db_state, run_sync

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN_URL = "/api/auth/token/"
UNKNOWN_KEY = "0123456789abcdef0123456789abcdef01234567"


def assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers.get("WWW-Authenticate") == "Token"
    if response.request.method != "HEAD":
        assert "detail" in response.json()


def allowed_methods(pattern) -> list[str]:
    """The methods the route's view answers (its Allow header), HEAD included."""
    view = pattern.callback.cls()
    view.setup(None)  # Django adds HEAD wherever there is a GET
    return view._allowed_methods()


# --- POST /api/auth/token/ --------------------------------------------------------------------
@pytest.mark.smoke
async def test_token_login_issues_a_new_working_token_stored_only_as_a_hash(make_client, agent):
    client = make_client()
    body = {"username": agent.username, "password": PASSWORD}
    first = await client.post(TOKEN_URL, json=body)
    second = await client.post(TOKEN_URL, json=body)
    assert first.status_code == second.status_code == 200
    keys = [first.json()["token"], second.json()["token"]]
    assert set(first.json()) == {"token"}
    assert keys[0] != keys[1] != agent.token  # one token per login: several sessions at once
    stored = await run_sync(lambda: list(Token.objects.values_list("key_hash", flat=True)))
    for key in keys:
        assert re.fullmatch(r"[0-9a-f]{40}", key)
        assert key not in stored  # never the key itself
        assert hashlib.sha256(key.encode()).hexdigest() in stored
        assert (await make_client(key).get("/api/agent/tickets/")).status_code == 200


async def test_token_login_ignores_a_stale_token_header(make_client, admin):
    response = await make_client(UNKNOWN_KEY).post(
        TOKEN_URL, json={"username": admin.username, "password": PASSWORD}
    )
    assert response.status_code == 200, response.text
    assert (await make_client(response.json()["token"]).get("/api/tickets/")).status_code == 200


@pytest.mark.parametrize(
    ("username", "password"),
    [
        pytest.param(None, "wrong-password", id="wrong-password"),
        pytest.param("nobody-by-this-name", PASSWORD, id="unknown-user"),
        pytest.param(None, PASSWORD.upper(), id="password-is-case-sensitive"),
        pytest.param(None, PASSWORD + " ", id="password-is-not-trimmed"),
    ],
)
async def test_token_login_refuses_wrong_credentials_with_400(
    make_client, agent, username, password
):
    before = await run_sync(db_state)
    response = await make_client().post(
        TOKEN_URL, json={"username": username or agent.username, "password": password}
    )
    assert response.status_code == 400, response.text
    assert "token" not in response.json()
    assert response.json()["non_field_errors"]
    assert await run_sync(db_state) == before


async def test_token_login_refuses_an_inactive_user_with_400(make_client, agent):
    await run_sync(services.User.objects.filter(pk=agent.pk).update, is_active=False)
    response = await make_client().post(
        TOKEN_URL, json={"username": agent.username, "password": PASSWORD}
    )
    assert response.status_code == 400, response.text
    assert "token" not in response.json()


async def test_token_login_refuses_missing_fields_with_field_errors(make_client):
    for body, missing in (
        ({}, {"username", "password"}),
        ({"password": PASSWORD}, {"username"}),
        ({"username": "someone"}, {"password"}),
        ({"username": "", "password": ""}, {"username", "password"}),
        ({"username": None, "password": None}, {"username", "password"}),
    ):
        response = await make_client().post(TOKEN_URL, json=body)
        assert response.status_code == 400, (body, response.text)
        assert set(response.json()) == missing, body


async def test_token_login_only_accepts_post(make_client):
    response = await make_client().get(TOKEN_URL)
    assert response.status_code == 405


# --- 401: no or bad credentials ---------------------------------------------------------------
BAD_AUTHORIZATIONS = {
    "no header": None,
    "token without key": "Token",
    "token and a space": "Token ",
    "bearer scheme": "Bearer x",
    "basic scheme": "Basic dXNlcjpwYXNz",
    "unknown token": f"Token {UNKNOWN_KEY}",
    "token with spaces": f"Token {UNKNOWN_KEY} extra",
    "non-ascii key": "Token caf\xe9".encode("latin-1"),
    "nul in key": b"Token \x00abc",  # PostgreSQL refuses NUL: must not reach the query
    "punctuation in key": "Token ../../etc",
}


@pytest.mark.smoke
async def test_missing_or_bad_credentials_answer_401_with_token_challenge(
    make_client, admin, agent
):
    await run_sync(create_tickets, admin, 2)
    before = await run_sync(db_state)
    client = make_client()
    for case, authorization in BAD_AUTHORIZATIONS.items():
        headers = {"Authorization": authorization} if authorization is not None else {}
        for url in ("/api/tickets/", "/api/agent/tickets/", f"/api/agents/{agent.pk}/"):
            method = "DELETE" if url.startswith("/api/agents/") else "GET"
            response = await client.request(method, url, headers=headers)
            assert response.status_code == 401, (case, url, response.text)
            assert response.headers.get("WWW-Authenticate") == "Token", (case, url)
    assert await run_sync(db_state) == before  # nothing assigned, nobody deactivated


async def test_deactivated_admins_token_answers_401(make_client, admin):
    client = make_client(admin.token)
    assert (await client.get("/api/tickets/")).status_code == 200
    await run_sync(services.User.objects.filter(pk=admin.pk).update, is_active=False)
    assert_401(await client.get("/api/tickets/"))


async def test_deactivated_agents_token_answers_401_and_takes_no_tickets(make_client, admin, agent):
    await run_sync(create_tickets, admin, 3)
    await run_sync(services.User.objects.filter(pk=agent.pk).update, is_active=False)
    before = await run_sync(db_state)
    client = make_client(agent.token)
    assert_401(await client.get("/api/agent/tickets/"))
    assert_401(await client.post("/api/agent/tickets/", json={"ticket_id": 1, "status": "closed"}))
    assert await run_sync(db_state) == before
    assert await run_sync(TicketAssignment.objects.count) == 0


# --- The role matrix --------------------------------------------------------------------------
# Which role each API route needs. Every route of support.api.urls except the login must be here
# (test_every_api_route_is_in_the_role_matrix), so a new route cannot skip the matrix.
ROUTE_ROLE = {
    "ticket-list": "admin",
    "ticket-detail": "admin",
    "agent-list": "admin",
    "agent-detail": "admin",
    "agent-tickets": "agent",
    "agent-ticket-release": "agent",
    # admins, and the agent that holds the ticket; another agent is told 404, as for a move
    "ticket-history": "admin or holder",
    "auth-logout": "any user",
    # admins see every event, agents their own
    "event-feed": "admin or agent",
}


@dataclass
class World:
    admin: object
    agent: object
    spare_agent: object
    held_ticket: int  # assigned to ``agent``
    open_ticket: int

    def url(self, pattern) -> str:
        kwargs = {}
        if "pk" in pattern.pattern.converters:
            kwargs["pk"] = {
                "agent-detail": self.spare_agent.pk,
                "ticket-history": self.held_ticket,
                "agent-ticket-release": self.held_ticket,
            }.get(pattern.name, self.open_ticket)
        return reverse(pattern.name, kwargs=kwargs)


# What the right role sends on each (route, method), and the success it must get.
Body = Callable[[World], dict] | None
RIGHT_ROLE_CALLS: dict[tuple[str, str], tuple[Body, int]] = {
    ("ticket-list", "GET"): (None, 200),
    ("ticket-list", "HEAD"): (None, 200),
    ("ticket-list", "POST"): (lambda w: {"title": "made by the role matrix"}, 201),
    ("ticket-list", "OPTIONS"): (None, 200),
    ("ticket-detail", "GET"): (None, 200),
    ("ticket-detail", "HEAD"): (None, 200),
    ("ticket-detail", "PUT"): (
        lambda w: {
            "title": "replaced",
            "description": "",
            "priority": "high",
            "status": "open",
            "assigned_to": None,
        },
        200,
    ),
    ("ticket-detail", "PATCH"): (lambda w: {"priority": "urgent"}, 200),
    ("ticket-detail", "DELETE"): (None, 204),
    ("ticket-detail", "OPTIONS"): (None, 200),
    ("agent-list", "GET"): (None, 200),
    ("agent-list", "HEAD"): (None, 200),
    ("agent-list", "POST"): (
        lambda w: {"username": "matrix-agent", "password": "A-long-enough-Passw0rd"},
        201,
    ),
    ("agent-list", "OPTIONS"): (None, 200),
    ("agent-detail", "GET"): (None, 200),
    ("agent-detail", "HEAD"): (None, 200),
    ("agent-detail", "PATCH"): (lambda w: {"is_active": True}, 200),
    ("agent-detail", "DELETE"): (None, 204),
    ("agent-detail", "OPTIONS"): (None, 200),
    ("agent-tickets", "GET"): (None, 200),
    ("agent-tickets", "HEAD"): (None, 200),
    ("agent-tickets", "POST"): (lambda w: {"ticket_id": w.held_ticket, "status": "resolved"}, 200),
    ("agent-tickets", "OPTIONS"): (None, 200),
    ("agent-ticket-release", "POST"): (None, 200),
    ("agent-ticket-release", "OPTIONS"): (None, 200),
    ("ticket-history", "GET"): (None, 200),
    ("ticket-history", "HEAD"): (None, 200),
    ("ticket-history", "OPTIONS"): (None, 200),
    ("event-feed", "GET"): (None, 200),
    ("event-feed", "HEAD"): (None, 200),
    ("event-feed", "OPTIONS"): (None, 200),
    ("auth-logout", "POST"): (None, 204),
    ("auth-logout", "OPTIONS"): (None, 200),
}

ROUTES = [
    pytest.param(pattern, method, id=f"{pattern.name}-{method}")
    for pattern in urlpatterns
    if pattern.name != "auth-token"
    for method in allowed_methods(pattern)
]


@pytest.fixture
def world(admin, agent):
    spare_agent = create_user(agent=True)
    held = create_held(admin, agent, 1)[0]
    open_ticket = create_tickets(admin, 1)[0]
    return World(admin, agent, spare_agent, held.pk, open_ticket.pk)


async def call(client: httpx.AsyncClient, world: World, pattern, method: str) -> httpx.Response:
    body_of, _ = RIGHT_ROLE_CALLS[(pattern.name, method)]
    kwargs = {"json": body_of(world)} if body_of is not None else {}
    return await client.request(method, world.url(pattern), **kwargs)


def test_every_api_route_is_in_the_role_matrix():
    names = {pattern.name for pattern in urlpatterns} - {"auth-token"}
    assert set(ROUTE_ROLE) == names
    pairs = {(p.values[0].name, p.values[1]) for p in ROUTES}
    assert pairs == set(RIGHT_ROLE_CALLS)
    # The matrix really exercises both roles and every write method.
    assert {method for _, method in pairs} >= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"}


def _dead_credentials(world) -> dict[str, str]:
    """Tokens that must all answer 401: unknown, expired, revoked, a deactivated agent's."""
    expired = token_issue(user_id=world.admin.pk)
    Token.objects.filter(key_hash=key_hash(expired)).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    revoked = token_issue(user_id=world.admin.pk)
    Token.objects.filter(key_hash=key_hash(revoked)).delete()
    gone = create_user(agent=True)
    type(gone).objects.filter(pk=gone.pk).update(is_active=False)
    return {"bad": UNKNOWN_KEY, "expired": expired, "revoked": revoked, "deactivated": gone.token}


@pytest.mark.parametrize(("pattern", "method"), ROUTES)
async def test_route_admits_only_its_role(make_client, world, pattern, method):
    """Anonymous, and bad, expired, revoked or deactivated users' tokens: 401 with the Token
    challenge. Authenticated with the wrong role (the other role, or no role at all): 403.
    Another agent on a ticket's history: 404. None of these changes any data. The right role
    (admin, agent, another agent where any agent will do) gets its success."""
    nobody = await run_sync(create_user)  # authenticated, neither admin nor agent
    dead = await run_sync(_dead_credentials, world)
    role = ROUTE_ROLE[pattern.name]
    if role == "admin":
        rights, wrongs = [world.admin], [world.agent, world.spare_agent, nobody]
    elif role == "agent":
        rights, wrongs = [world.agent], [world.admin, nobody]
    elif role == "any user":
        rights, wrongs = [world.admin, world.agent, nobody], []
    else:
        rights, wrongs = [world.admin, world.agent], [nobody]
    before = await run_sync(db_state)

    assert_401(await call(make_client(), world, pattern, method))
    for kind, key in dead.items():
        response = await call(make_client(key), world, pattern, method)
        assert response.status_code == 401, (kind, response.text)
        assert response.headers.get("WWW-Authenticate") == "Token", kind
    for user in wrongs:
        response = await call(make_client(user.token), world, pattern, method)
        assert response.status_code == 403, (user.username, response.text)
        if method != "HEAD":
            assert "detail" in response.json()
    if role == "admin or holder" and method == "GET":
        response = await call(make_client(world.spare_agent.token), world, pattern, method)
        assert response.status_code == 404, response.text
    assert await run_sync(db_state) == before

    if role == "agent" and method in ("GET", "POST"):
        # another agent: served as an agent, but the held ticket is not its own
        response = await call(make_client(world.spare_agent.token), world, pattern, method)
        assert response.status_code == (200 if method == "GET" else 404), response.text

    _, expected = RIGHT_ROLE_CALLS[(pattern.name, method)]
    for user in rights:
        response = await call(make_client(user.token), world, pattern, method)
        assert response.status_code == expected, (user.username, response.text)


@pytest.mark.smoke
async def test_agent_on_an_admin_endpoint_gets_403(agent_client, admin):
    await run_sync(create_tickets, admin, 1)
    response = await agent_client.get("/api/tickets/")
    assert response.status_code == 403
    assert response.json() == {"detail": "Only admins may use this endpoint."}


@pytest.mark.smoke
async def test_admin_who_is_not_an_agent_gets_403_on_agent_endpoint_and_takes_nothing(
    admin_client, admin
):
    await run_sync(create_tickets, admin, 3)
    response = await admin_client.get("/api/agent/tickets/")
    assert response.status_code == 403
    assert response.json() == {"detail": "Only agents may use this endpoint."}
    assert await run_sync(TicketAssignment.objects.count) == 0


@pytest.mark.smoke
async def test_admin_who_is_also_an_agent_may_use_the_agent_endpoints(make_client):
    both = await run_sync(create_user, staff=True, agent=True)
    await run_sync(create_tickets, both, 2)
    client = make_client(both.token)

    fetched = await client.get("/api/agent/tickets/")
    assert fetched.status_code == 200, fetched.text
    held = fetched.json()
    assert len(held) == 2
    assert {row["assigned_to"] for row in held} == {both.pk}

    moved = await client.post(
        "/api/agent/tickets/", json={"ticket_id": held[0]["id"], "status": "resolved"}
    )
    assert moved.status_code == 200, moved.text
    assert moved.json()["status"] == "resolved"
    assert (await client.get("/api/tickets/")).status_code == 200


# --- Session auth (the browsable API) ---------------------------------------------------------
# Session and CSRF cookies are Secure (debug is off), so the session talks https to the app.
BASE = "https://testserver"


@pytest.fixture
def make_browser(asgi_app):
    return lambda: httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi_app), base_url=BASE)


@pytest.fixture
def browser(make_browser):
    return make_browser()


async def log_in(browser: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    page = await browser.get("/api-auth/login/")
    assert page.status_code == 200
    return await browser.post(
        "/api-auth/login/",
        data={
            "username": username,
            "password": password,
            "csrfmiddlewaretoken": browser.cookies["csrftoken"],
            "next": "/api/tickets/",
        },
        headers={"Referer": f"{BASE}/api-auth/login/"},
    )


@pytest.mark.smoke
async def test_session_login_opens_the_browsable_api_for_an_admin(browser, admin):
    await run_sync(create_tickets, admin, 1)
    login = await log_in(browser, admin.username, PASSWORD)
    assert login.status_code == 302
    assert login.headers["Location"] == "/api/tickets/"
    assert "sessionid" in browser.cookies

    page = await browser.get("/api/tickets/", headers={"Accept": "text/html"})
    assert page.status_code == 200, page.text[:500]
    assert page.headers["Content-Type"].startswith("text/html")
    assert "Ticket List" in page.text

    data = await browser.get("/api/tickets/", headers={"Accept": "application/json"})
    assert data.status_code == 200
    assert data.json()["count"] == 1


async def test_session_login_with_a_wrong_password_stays_anonymous(browser, admin):
    login = await log_in(browser, admin.username, "not-the-password")
    assert login.status_code == 200  # the form again, with an error
    assert "sessionid" not in browser.cookies
    assert_401(await browser.get("/api/tickets/", headers={"Accept": "application/json"}))


async def test_session_writes_need_the_csrf_token(browser, admin):
    await log_in(browser, admin.username, PASSWORD)
    refused = await browser.post("/api/tickets/", json={"title": "no csrf"})
    assert refused.status_code == 403
    assert "CSRF" in refused.json()["detail"]
    assert await run_sync(Ticket.objects.count) == 0

    accepted = await browser.post(
        "/api/tickets/",
        json={"title": "with csrf"},
        headers={"X-CSRFToken": browser.cookies["csrftoken"], "Referer": f"{BASE}/api/tickets/"},
    )
    assert accepted.status_code == 201, accepted.text
    assert await run_sync(Ticket.objects.count) == 1


async def test_session_roles_follow_the_agents_group(browser, make_browser, admin, agent):
    await run_sync(create_tickets, admin, 2)
    await log_in(browser, agent.username, PASSWORD)
    fetched = await browser.get("/api/agent/tickets/", headers={"Accept": "application/json"})
    assert fetched.status_code == 200, fetched.text
    assert len(fetched.json()) == 2
    assert (await browser.get("/api/tickets/")).status_code == 403

    admin_browser = make_browser()
    await log_in(admin_browser, admin.username, PASSWORD)
    assert (await admin_browser.get("/api/agent/tickets/")).status_code == 403
