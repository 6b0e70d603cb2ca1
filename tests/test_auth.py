"""Authentication and roles: the token login, 401 for missing or bad credentials, the role
matrix over every API route, admins who are also agents, and session auth for the browsable API.

The safe-retry headers go through the same matrix: an Idempotency-Key belongs to its user and
stores nothing the checks refused; If-Match and If-None-Match are judged only for a caller who
may see the ticket (a 412's ETag, a 304, would tell its version).
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
from support.models import IdempotencyKey, Ticket, TicketAssignment
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


async def call(
    client: httpx.AsyncClient, world: World, pattern, method: str, headers: dict | None = None
) -> httpx.Response:
    body_of, _ = RIGHT_ROLE_CALLS[(pattern.name, method)]
    kwargs = {"json": body_of(world)} if body_of is not None else {}
    return await client.request(method, world.url(pattern), headers=headers, **kwargs)


def guarded(world: World, key: str = "matrix-key") -> dict:
    """Headers that change an authorized answer: an Idempotency-Key (its answer is stored),
    If-Match naming versions the tickets never had (412) and If-None-Match: * (304 on a
    ticket's GET). A route without them ignores them."""
    stale = f'"{world.held_ticket}.0", "{world.open_ticket}.0"'
    return {"Idempotency-Key": key, "If-Match": stale, "If-None-Match": "*"}


def assert_reveals_nothing(response: httpx.Response) -> None:
    """A refusal by the checks or a 404: no version (ETag), no stored answer (replay)."""
    assert response.status_code in (401, 403, 404), response.text
    assert "ETag" not in response.headers, response.headers
    assert "Idempotent-Replayed" not in response.headers, response.headers


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
    Another agent on a ticket's history: 404. None of these changes any data, and each is the
    same with an Idempotency-Key, a stale If-Match and If-None-Match: * (``guarded``): no 412,
    no 304, no ETag, nothing stored under the key. The right role (admin, agent, another agent
    where any agent will do) gets its success."""
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

    for headers in (None, guarded(world)):
        response = await call(make_client(), world, pattern, method, headers)
        assert_401(response)
        assert_reveals_nothing(response)
        for kind, key in dead.items():
            response = await call(make_client(key), world, pattern, method, headers)
            assert response.status_code == 401, (kind, response.text)
            assert response.headers.get("WWW-Authenticate") == "Token", kind
            assert_reveals_nothing(response)
        for user in wrongs:
            response = await call(make_client(user.token), world, pattern, method, headers)
            assert response.status_code == 403, (user.username, response.text)
            assert_reveals_nothing(response)
            if method != "HEAD":
                assert "detail" in response.json()
        if role == "admin or holder" and method == "GET":
            client = make_client(world.spare_agent.token)
            response = await call(client, world, pattern, method, headers)
            assert response.status_code == 404, response.text
            assert_reveals_nothing(response)
    assert await run_sync(db_state) == before

    if role == "agent" and method in ("GET", "POST"):
        # another agent: served as an agent, but the held ticket is not its own; not even a
        # precondition on it is judged (412 would tell its version)
        client = make_client(world.spare_agent.token)
        response = await call(client, world, pattern, method)
        assert response.status_code == (200 if method == "GET" else 404), response.text
        if method == "POST":
            response = await call(client, world, pattern, method, guarded(world))
            assert response.status_code == 404, response.text
            assert_reveals_nothing(response)

    _, expected = RIGHT_ROLE_CALLS[(pattern.name, method)]
    for user in rights:
        response = await call(make_client(user.token), world, pattern, method)
        assert response.status_code == expected, (user.username, response.text)


# --- Idempotency-Key and preconditions across users, roles and refusals -----------------------
KEYED = [p for p in ROUTES if p.values[1] == "POST" and p.values[0].callback.cls.idempotency_keys]
KEY = {"Idempotency-Key": "one-key"}
# What a route answers ``guarded`` headers with once the caller may see the ticket: a stale
# If-Match 412, If-None-Match: * 304 (the matrix's control: the headers do bite).
PRECONDITIONS = {
    # a stale If-Match is judged before If-None-Match (RFC 9110 13.2.2), on a read too
    ("ticket-detail", "GET"): 412,
    ("ticket-detail", "HEAD"): 412,
    ("ticket-detail", "PUT"): 412,
    ("ticket-detail", "PATCH"): 412,
    ("ticket-detail", "DELETE"): 412,
    ("agent-tickets", "POST"): 412,
    ("agent-ticket-release", "POST"): 412,
}
# A second user of the route's role sending the first one's exact request, key included: its
# own request's answer. A new admin creates its own ticket, its agent's username is taken; the
# other agent does not hold the ticket; the other user's logout revokes its own token.
SECOND_USERS_OWN = {
    "ticket-list": 201,
    "agent-list": 400,
    "agent-tickets": 404,
    "agent-ticket-release": 404,
    "auth-logout": 204,
}


def _without_keys(state: dict) -> dict:
    return {table: rows for table, rows in state.items() if table != "idempotency_keys"}


def _stored_keys() -> set[tuple[int, str]]:
    return set(IdempotencyKey.objects.values_list("user_id", "key"))


def _grant(user, role: str) -> None:
    if role == "admin":
        services.User.objects.filter(pk=user.pk).update(is_staff=True)
    else:
        user.groups.add(services.agents_group())


def _expired_token(user) -> str:
    key = token_issue(user_id=user.pk)
    Token.objects.filter(key_hash=key_hash(key)).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    return key


def test_every_keyed_route_and_precondition_is_in_the_matrix():
    """The routes that take Idempotency-Key (the views' flag) and those whose schema documents
    If-Match or If-None-Match are the ones the tests below go through (HEAD: the GET's)."""
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    keyed, conditional = set(), set()
    for pattern in urlpatterns:
        kwargs = {"pk": 1} if "pk" in pattern.pattern.converters else {}
        path = reverse(pattern.name, kwargs=kwargs).replace("/1/", "/{id}/")
        for method, operation in schema["paths"].get(path, {}).items():
            headers = {p["name"] for p in operation.get("parameters", []) if p["in"] == "header"}
            if "Idempotency-Key" in headers:
                keyed.add((pattern.name, method.upper()))
            if headers & {"If-Match", "If-None-Match"}:
                conditional.add((pattern.name, method.upper()))
    assert keyed == {(p.values[0].name, p.values[1]) for p in KEYED}
    assert conditional == set(PRECONDITIONS) - {("ticket-detail", "HEAD")}


@pytest.mark.parametrize(
    ("pattern", "method"), [p for p in ROUTES if (p.values[0].name, p.values[1]) in PRECONDITIONS]
)
async def test_the_right_role_meets_the_preconditions_the_refused_never_do(
    make_client, world, pattern, method
):
    """The control of the matrix's ``guarded`` calls: to a caller that may see the ticket, the
    same headers answer 412 with the ticket's current ETag, and change nothing."""
    user = world.admin if ROUTE_ROLE[pattern.name] == "admin" else world.agent
    ticket = world.open_ticket if pattern.name == "ticket-detail" else world.held_ticket
    before = await run_sync(db_state)
    response = await call(make_client(user.token), world, pattern, method, guarded(world))
    assert response.status_code == PRECONDITIONS[(pattern.name, method)], response.text
    assert response.headers["ETag"] == f'"{ticket}.1"'
    assert _without_keys(await run_sync(db_state)) == _without_keys(before)


@pytest.mark.parametrize(("pattern", "method"), KEYED)
async def test_a_keyed_request_the_checks_refuse_stores_nothing_and_its_retry_runs_anew(
    make_client, world, pattern, method
):
    """Anonymous (401), an expired token (401), the wrong role (403): nothing is stored under
    the key, so the same request sent again is refused again, never replayed. Once the caller
    is fixed (a new token, the role given) the key's request runs as new, and only then is its
    answer stored."""
    role = ROUTE_ROLE[pattern.name]
    user = world.admin if role == "admin" else world.agent
    nobody = await run_sync(create_user)  # authenticated, no role
    refusals = [(make_client(), 401), (make_client(await run_sync(_expired_token, user)), 401)]
    if role != "any user":
        refusals.append((make_client(nobody.token), 403))
    before = await run_sync(db_state)
    for _ in range(2):  # and again, nothing fixed
        for client, status in refusals:
            response = await call(client, world, pattern, method, KEY)
            assert response.status_code == status, response.text
            assert_reveals_nothing(response)
    assert await run_sync(db_state) == before

    fixed = make_client(await run_sync(token_issue, user_id=user.pk))
    ran = await call(fixed, world, pattern, method, KEY)
    assert ran.status_code == RIGHT_ROLE_CALLS[(pattern.name, method)][1], ran.text
    assert "Idempotent-Replayed" not in ran.headers
    again = await call(fixed, world, pattern, method, KEY)  # (a logout's: its revoked token)
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert (again.status_code, again.content) == (ran.status_code, ran.content)
    stored = {(user.pk, KEY["Idempotency-Key"])}
    if role != "any user":
        await run_sync(_grant, nobody, role)
        own = await call(make_client(nobody.token), world, pattern, method, KEY)
        assert own.status_code == SECOND_USERS_OWN[pattern.name], own.text
        assert "Idempotent-Replayed" not in own.headers
        stored.add((nobody.pk, KEY["Idempotency-Key"]))
    assert await run_sync(_stored_keys) == stored


@pytest.mark.parametrize(("pattern", "method"), KEYED)
async def test_another_user_reusing_a_key_gets_its_own_answer_never_the_first_users(
    make_client, world, pattern, method
):
    """Keys belong to their user: a second user of the role sending the first one's exact
    request under its key runs its own request (not a replay, not a 422), and each one's
    retry replays its own answer. A user of another role is refused by the checks (403), and
    the anonymous (401), before any key is looked at."""
    role = ROUTE_ROLE[pattern.name]
    if role == "admin":
        first_user, second_user = world.admin, await run_sync(create_user, staff=True)
        wrong = world.agent
    elif role == "agent":
        first_user, second_user, wrong = world.agent, world.spare_agent, world.admin
    else:
        first_user, second_user, wrong = world.agent, world.admin, None
    first_client, second_client = make_client(first_user.token), make_client(second_user.token)

    first = await call(first_client, world, pattern, method, KEY)
    assert first.status_code == RIGHT_ROLE_CALLS[(pattern.name, method)][1], first.text
    before = await run_sync(db_state)
    if wrong is not None:
        response = await call(make_client(wrong.token), world, pattern, method, KEY)
        assert response.status_code == 403, response.text
        assert_reveals_nothing(response)
    response = await call(make_client(), world, pattern, method, KEY)
    assert_401(response)
    assert_reveals_nothing(response)
    assert await run_sync(db_state) == before

    second = await call(second_client, world, pattern, method, KEY)
    assert second.status_code == SECOND_USERS_OWN[pattern.name], second.text
    assert "Idempotent-Replayed" not in second.headers
    if second.status_code == first.status_code == 201:
        assert second.json()["id"] != first.json()["id"]
        assert second.headers["ETag"] != first.headers["ETag"]
    if pattern.name == "auth-logout":  # its own token revoked, not the first user's answer
        assert_401(await second_client.post(world.url(pattern)))
    for client, answer in ((second_client, second), (first_client, first)):
        retry = await call(client, world, pattern, method, KEY)
        assert retry.headers.get("Idempotent-Replayed") == "true"
        assert (retry.status_code, retry.content) == (answer.status_code, answer.content)
        assert retry.headers.get("ETag") == answer.headers.get("ETag")
    key = KEY["Idempotency-Key"]
    assert await run_sync(_stored_keys) == {(first_user.pk, key), (second_user.pk, key)}


@pytest.mark.smoke
async def test_one_key_on_an_admin_route_and_an_agent_route_is_each_users_own(make_client, world):
    """An admin's key on a ticket create and an agent's same key on a move are two users'
    requests: both run. Each sent to the other role's route is refused by the role check (403),
    never answered with the other's stored answer. A user who has both roles has one set of
    keys: its key sent with another request on another route is 422 and changes nothing."""
    admin, agent = make_client(world.admin.token), make_client(world.agent.token)
    create = {"title": "by the admin"}
    move = {"ticket_id": world.held_ticket, "status": "resolved"}
    created = await admin.post("/api/tickets/", json=create, headers=KEY)
    assert created.status_code == 201, created.text
    moved = await agent.post("/api/agent/tickets/", json=move, headers=KEY)
    assert moved.status_code == 200, moved.text
    assert "Idempotent-Replayed" not in moved.headers
    assert moved.json()["status"] == "resolved"
    before = await run_sync(db_state)
    for response in (
        await agent.post("/api/tickets/", json=create, headers=KEY),
        await admin.post("/api/agent/tickets/", json=move, headers=KEY),
    ):
        assert response.status_code == 403, response.text
        assert_reveals_nothing(response)
    assert await run_sync(db_state) == before

    both = await run_sync(create_user, staff=True, agent=True)
    client = make_client(both.token)
    mine = await client.post("/api/tickets/", json={"title": "by both"}, headers=KEY)
    assert mine.status_code == 201, mine.text
    before = await run_sync(db_state)
    other = await client.post(
        "/api/agent/tickets/",
        json={"ticket_id": mine.json()["id"], "status": "resolved"},
        headers=KEY,
    )
    assert other.status_code == 422, other.text
    assert await run_sync(db_state) == before


@pytest.mark.parametrize(("pattern", "method"), KEYED)
async def test_a_malformed_key_never_hides_a_refusal_of_the_checks(
    make_client, world, pattern, method
):
    """The checks come first: no or bad credentials are 401 with the Token challenge, the wrong
    role 403, whatever the Idempotency-Key looks like (its 400 is for a caller who may ask)."""
    nobody = await run_sync(create_user)
    before = await run_sync(db_state)
    for value in (b"", b"a b", "caf\xe9".encode(), b"x" * 256):
        headers = {"Idempotency-Key": value}
        for client in (make_client(), make_client(UNKNOWN_KEY)):
            assert_401(await call(client, world, pattern, method, headers))
        if ROUTE_ROLE[pattern.name] != "any user":
            response = await call(make_client(nobody.token), world, pattern, method, headers)
            assert response.status_code == 403, response.text
    assert await run_sync(db_state) == before


@pytest.mark.smoke
async def test_a_precondition_on_a_ticket_that_is_gone_is_404_without_an_etag(make_client, world):
    """RFC 9110 13.2.1: preconditions are ignored when the request without them would not
    succeed. On a deleted ticket every precondition (stale, current, or *) is 404, never 412
    or 304, for the admin and for the agent that held it."""
    admin, agent = make_client(world.admin.token), make_client(world.agent.token)
    gone = [world.open_ticket, world.held_ticket]
    for ticket in gone:
        assert (await admin.delete(f"/api/tickets/{ticket}/")).status_code == 204
    before = await run_sync(db_state)
    for ticket in gone:
        url = f"/api/tickets/{ticket}/"
        for tag in (f'"{ticket}.0"', f'"{ticket}.1"', "*"):
            for response in (
                await admin.get(url, headers={"If-None-Match": tag}),
                await admin.patch(url, json={"title": "x"}, headers={"If-Match": tag}),
                await admin.put(url, json={"title": "x"}, headers={"If-Match": tag}),
                await admin.delete(url, headers={"If-Match": tag}),
                await agent.post(
                    "/api/agent/tickets/",
                    json={"ticket_id": ticket, "status": "resolved"},
                    headers={"If-Match": tag},
                ),
                await agent.post(
                    f"/api/agent/tickets/{ticket}/release/", headers={"If-Match": tag}
                ),
            ):
                assert response.status_code == 404, (response.request.method, tag, response.text)
                assert_reveals_nothing(response)
    assert await run_sync(db_state) == before


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
