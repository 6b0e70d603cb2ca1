"""Bad input: every refusal is a 4xx (never a 500) and leaves the data exactly as it was.

Each refusal test snapshots the ticket, assignment, user, membership and token rows before the
requests and compares them after; an autouse guard fails any test during which Django logged a
server error.
"""

import gc
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest
from django.conf import settings

from support.models import Ticket
from tests.conftest import create_held, create_tickets, db_state, run_sync

pytestmark = pytest.mark.django_db(transaction=True)

GOOD_PASSWORD = "A-long-enough-Passw0rd"


@pytest.fixture(autouse=True)
def no_server_error_logged(caplog):
    yield
    errors = [
        record.getMessage()
        for record in caplog.get_records("call")
        if record.name == "django.request" and record.levelno >= logging.ERROR
    ]
    assert errors == [], "a request ended in a server error"


@dataclass
class World:
    admin: object
    agent: object
    held: int  # assigned to the agent
    resolved: int  # resolved by the agent
    open: int
    before: dict | None = None

    async def snapshot(self) -> None:
        self.before = await run_sync(db_state)

    async def assert_unchanged(self) -> None:
        assert self.before is not None
        assert await run_sync(db_state) == self.before, "a refused request changed data"


@pytest.fixture
async def world(admin, agent):
    def build():
        held = create_held(admin, agent, 2, description="held")
        resolved = create_held(admin, agent, 1, status=Ticket.Status.RESOLVED)
        opened = create_tickets(admin, 2, priority=Ticket.Priority.HIGH)
        return World(admin, agent, held[0].pk, resolved[0].pk, opened[0].pk)

    world = await run_sync(build)
    await world.snapshot()
    return world


@dataclass(frozen=True)
class Endpoint:
    """An endpoint that takes a JSON body, the role that may call it, and a valid body."""

    name: str
    method: str
    path: str  # "{held}": a ticket the agent holds; "{open}": an open ticket; "{agent}"
    role: str | None  # "admin", "agent" or None (anonymous)
    valid_body: Callable[[World], dict]
    success: int

    def url(self, world: World) -> str:
        return self.path.format(held=world.held, open=world.open, agent=world.agent.pk)

    def client(self, make_client, world: World) -> httpx.AsyncClient:
        user = {"admin": world.admin, "agent": world.agent, None: None}[self.role]
        return make_client(user.token if user is not None else None)


JSON_ENDPOINTS = [
    Endpoint("create-ticket", "POST", "/api/tickets/", "admin", lambda w: {"title": "t"}, 201),
    Endpoint(
        "put-ticket",
        "PUT",
        "/api/tickets/{open}/",
        "admin",
        lambda w: {
            "title": "t",
            "description": "",
            "priority": "low",
            "status": "open",
            "assigned_to": None,
        },
        200,
    ),
    Endpoint(
        "patch-ticket",
        "PATCH",
        "/api/tickets/{held}/",
        "admin",
        lambda w: {"priority": "urgent"},
        200,
    ),
    Endpoint(
        "create-agent",
        "POST",
        "/api/agents/",
        "admin",
        lambda w: {"username": "newcomer", "password": GOOD_PASSWORD},
        201,
    ),
    Endpoint(
        "agent-move",
        "POST",
        "/api/agent/tickets/",
        "agent",
        lambda w: {"ticket_id": w.held, "status": "resolved"},
        200,
    ),
    Endpoint(
        "patch-agent",
        "PATCH",
        "/api/agents/{agent}/",
        "admin",
        lambda w: {"is_active": True},
        200,
    ),
    Endpoint(
        "token-login",
        "POST",
        "/api/auth/token/",
        None,
        lambda w: {"username": w.admin.username, "password": "pw-for-tests-1"},
        200,
    ),
]

JSON = {"Content-Type": "application/json"}


async def send_raw(client, endpoint: Endpoint, world: World, body: bytes, headers=JSON):
    return await client.request(endpoint.method, endpoint.url(world), content=body, headers=headers)


# --- Bodies that are not a JSON object ---------------------------------------------------------
MALFORMED_JSON = [
    b'{"title": "x"',
    b"{'title': 'x'}",
    b'{"title": "x",}',
    b'{"title": "x"} trailing',
    b'{"title": NaN}',
    b'{"title": Infinity}',
    b"\xff\xfe\x00{",
    b'{"title": "\xc3"}',  # invalid UTF-8
    b'{"title": 1' + b"0" * 5000 + b"}",  # more digits than Python converts
    b"[" * 1000,  # nested deeper than Python's decoder recurses
    b'{"a":' * 1000,
]


@pytest.mark.smoke
async def test_malformed_json_is_refused_with_400_and_a_detail_on_every_endpoint(
    make_client, world
):
    for endpoint in JSON_ENDPOINTS:
        client = endpoint.client(make_client, world)
        for body in MALFORMED_JSON:
            response = await send_raw(client, endpoint, world, body)
            assert response.status_code == 400, (endpoint.name, body[:40], response.text)
            assert "JSON parse error" in response.json()["detail"], (endpoint.name, body[:40])
    await world.assert_unchanged()


async def test_json_that_is_not_an_object_is_refused_with_400_on_every_endpoint(make_client, world):
    for endpoint in JSON_ENDPOINTS:
        client = endpoint.client(make_client, world)
        wrapped = b"[" + json.dumps(endpoint.valid_body(world)).encode() + b"]"
        for body in (b"[]", wrapped, b"42", b'"x"', b"true", b"null"):
            response = await send_raw(client, endpoint, world, body)
            assert response.status_code == 400, (endpoint.name, body, response.text)
            assert "non_field_errors" in response.json(), (endpoint.name, body)
    await world.assert_unchanged()


@pytest.mark.smoke
async def test_non_json_content_types_are_refused_with_415_on_every_endpoint(make_client, world):
    for endpoint in JSON_ENDPOINTS:
        client = endpoint.client(make_client, world)
        url = endpoint.url(world)
        valid = endpoint.valid_body(world)
        as_json = json.dumps(valid).encode()
        attempts = {
            "form": dict(data={k: "" if v is None else str(v) for k, v in valid.items()}),
            "multipart": dict(files={"file": ("a.json", as_json, "application/json")}),
            "text/plain": dict(content=as_json, headers={"Content-Type": "text/plain"}),
            "xml": dict(content=b"<title>t</title>", headers={"Content-Type": "application/xml"}),
            "json-lookalike": dict(
                content=as_json, headers={"Content-Type": "application/vnd.api+json"}
            ),
            "no content type": dict(content=as_json),
        }
        for kind, kwargs in attempts.items():
            response = await client.request(endpoint.method, url, **kwargs)
            assert response.status_code == 415, (endpoint.name, kind, response.text)
            assert "Unsupported media type" in response.json()["detail"], (endpoint.name, kind)
    await world.assert_unchanged()

    # The same bodies as JSON are accepted: the content type alone was refused.
    for endpoint in JSON_ENDPOINTS:
        client = endpoint.client(make_client, world)
        response = await client.request(
            endpoint.method, endpoint.url(world), json=endpoint.valid_body(world)
        )
        assert response.status_code == endpoint.success, (endpoint.name, response.text)


# --- Types: every field takes its own JSON type, nothing converted -----------------------------
# Each field of each body: its JSON type, and a right value of it (for the wrong values below).
BODY_FIELDS = [
    ("create-ticket", "title", "string"),
    ("create-ticket", "description", "string"),
    ("create-ticket", "priority", "string"),
    *(
        (endpoint, field, "string")
        for endpoint in ("put-ticket", "patch-ticket")
        for field in ("title", "description", "priority", "status")
    ),
    ("put-ticket", "assigned_to", "integer or null"),
    ("patch-ticket", "assigned_to", "integer or null"),
    ("agent-move", "ticket_id", "integer"),
    ("agent-move", "status", "string"),
    ("create-agent", "username", "string"),
    ("create-agent", "password", "string"),
    ("create-agent", "email", "string"),
    ("patch-agent", "is_active", "boolean"),
    ("token-login", "username", "string"),
    ("token-login", "password", "string"),
]


def wrong_type_values(kind: str, right) -> list:
    """JSON values of every type but ``kind``, as close to ``right`` as the type allows:
    what a lenient parser would convert ("11" and 14.0 for 11, 5 for a string, 1 for true)."""
    wrapped = [[right], {"value": right}]
    if kind == "string":
        return [5, 0, 1.5, 14.0, True, False, None, *wrapped]
    if kind == "boolean":
        return ["true", "false", "", 1, 0, 1.0, None, *wrapped]
    wrong = [str(right), f" {right} ", float(right), right + 0.5, True, False, "", *wrapped]
    return wrong if kind == "integer or null" else [*wrong, None]


def right_value(world: World, endpoint: str, field: str):
    return {"ticket_id": world.held, "assigned_to": world.agent.pk}.get(
        field, ENDPOINTS[endpoint].valid_body(world).get(field, "x")
    )


ENDPOINTS = {endpoint.name: endpoint for endpoint in JSON_ENDPOINTS}


@pytest.mark.parametrize(
    ("endpoint", "field", "kind"), BODY_FIELDS, ids=[f"{e}-{f}" for e, f, _ in BODY_FIELDS]
)
async def test_a_value_of_the_wrong_json_type_is_refused_not_converted(
    make_client, world, endpoint, field, kind
):
    endpoint = ENDPOINTS[endpoint]
    client = endpoint.client(make_client, world)
    for value in wrong_type_values(kind, right_value(world, endpoint.name, field)):
        body = {**endpoint.valid_body(world), field: value}
        response = await client.request(endpoint.method, endpoint.url(world), json=body)
        assert response.status_code == 400, (field, value, response.text)
        assert list(response.json()) == [field], (field, value, response.text)
    await world.assert_unchanged()


# --- Strings: length, blanks, NUL bytes --------------------------------------------------------
@pytest.mark.smoke
async def test_title_over_200_characters_after_trimming_is_refused(admin_client, world):
    too_long = "  " + "t" * 201 + "  "
    for method, url, extra in (
        ("POST", "/api/tickets/", {}),
        ("PATCH", f"/api/tickets/{world.held}/", {}),
        (
            "PUT",
            f"/api/tickets/{world.open}/",
            {"description": "", "priority": "low", "status": "open", "assigned_to": None},
        ),
    ):
        response = await admin_client.request(method, url, json={"title": too_long, **extra})
        assert response.status_code == 400, (method, response.text)
        assert list(response.json()) == ["title"]
        assert "200" in response.json()["title"][0]
    await world.assert_unchanged()


async def test_description_over_10000_characters_is_refused(admin_client, world):
    too_long = "d" * 10_001
    create = await admin_client.post("/api/tickets/", json={"title": "t", "description": too_long})
    patch = await admin_client.patch(
        f"/api/tickets/{world.held}/", json={"title": "new", "description": too_long}
    )
    for response in (create, patch):
        assert response.status_code == 400, response.text
        assert list(response.json()) == ["description"]
    await world.assert_unchanged()


async def test_title_and_description_exactly_at_their_limits_are_accepted(admin_client, world):
    title, description = "t" * 200, "d" * 10_000
    response = await admin_client.post(
        "/api/tickets/", json={"title": f"  {title}\t", "description": description}
    )
    assert response.status_code == 201, response.text
    assert response.json()["title"] == title
    stored = await run_sync(
        Ticket.objects.values("title", "description").get, pk=response.json()["id"]
    )
    assert stored == {"title": title, "description": description}


async def test_blank_titles_are_refused(admin_client, world):
    for title in ("", " ", "          ", "\t\n "):
        for method, url in (("POST", "/api/tickets/"), ("PATCH", f"/api/tickets/{world.held}/")):
            response = await admin_client.request(method, url, json={"title": title})
            assert response.status_code == 400, (method, repr(title), response.text)
            assert list(response.json()) == ["title"]
    await world.assert_unchanged()


async def test_overlong_usernames_and_passwords_are_refused(make_client, admin_client, world):
    cases = [
        ("/api/agents/", {"username": "u" * 151, "password": GOOD_PASSWORD}, "username"),
        ("/api/agents/", {"username": "fine", "password": "P4ss-" + "w" * 124}, "password"),
        ("/api/auth/token/", {"username": "u" * 151, "password": "x"}, "username"),
        ("/api/auth/token/", {"username": "u", "password": "p" * 129}, "password"),
    ]
    for url, body, field in cases:
        client = admin_client if url == "/api/agents/" else make_client()
        response = await client.post(url, json=body)
        assert response.status_code == 400, (url, field, response.text)
        assert field in response.json()
    await world.assert_unchanged()


@pytest.mark.smoke
async def test_nul_bytes_in_body_strings_are_refused_with_400(make_client, admin_client, world):
    nul = "bad\x00value"
    held = f"/api/tickets/{world.held}/"
    cases = [
        (admin_client, "POST", "/api/tickets/", {"title": nul}, "title"),
        (admin_client, "POST", "/api/tickets/", {"title": "t", "description": nul}, "description"),
        (admin_client, "PATCH", held, {"title": nul}, "title"),
        (admin_client, "PATCH", held, {"description": nul}, "description"),
        (admin_client, "PATCH", held, {"priority": "high\x00"}, "priority"),
        (admin_client, "PATCH", held, {"status": "open\x00"}, "status"),
        (make_client(), "POST", "/api/auth/token/", {"username": nul, "password": "p"}, "username"),
        (
            make_client(),
            "POST",
            "/api/auth/token/",
            {"username": world.admin.username, "password": "pw-for-tests-1\x00"},
            "password",
        ),
        (
            admin_client,
            "POST",
            "/api/agents/",
            {"username": nul, "password": GOOD_PASSWORD},
            "username",
        ),
        (
            admin_client,
            "POST",
            "/api/agents/",
            {"username": "nul1", "password": nul * 3},
            "password",
        ),
        (
            admin_client,
            "POST",
            "/api/agents/",
            {"username": "nul2", "password": GOOD_PASSWORD, "email": "a\x00@example.com"},
            "email",
        ),
    ]
    for client, method, url, body, field in cases:
        response = await client.request(method, url, json=body)
        assert response.status_code == 400, (url, body, response.text)
        assert field in response.json(), (url, body, response.text)
    await world.assert_unchanged()


async def test_nul_bytes_in_the_query_string_are_refused_with_400(admin_client, world):
    for params, field in (
        ({"search": "ticket\x00"}, "search"),
        ({"search": "\x00"}, "search"),
        ({"ordering": "title\x00"}, "ordering"),
        ({"ordering": "\x00-created_at"}, "ordering"),
        ({"status": "open\x00"}, "status"),
        ({"priority": "\x00"}, "priority"),
        ({"assigned_to": "1\x00"}, "assigned_to"),
        ({"cursor": "\x00"}, "cursor"),
    ):
        response = await admin_client.get("/api/tickets/", params=params)
        assert response.status_code == 400, (params, response.text)
        assert field in response.json(), params
    await world.assert_unchanged()


# --- Ids ---------------------------------------------------------------------------------------
@pytest.mark.smoke
async def test_path_ids_that_are_out_of_range_or_not_ids_answer_404(admin_client, world):
    full_put = {
        "title": "x",
        "description": "",
        "priority": "low",
        "status": "open",
        "assigned_to": None,
    }
    bad_ids = [
        "99999999999999999999",  # 20 digits
        "9999999999999999999",  # 19 digits, over 2**63 - 1
        str(2**63),
        "999999999999999999",  # 18 digits: in range, absent
        "-1",
        "0",
        "abc",
        "1.5",
        "1e3",
        "%00",
        "1%00",
        "%C2%B2",  # a superscript two, a "digit" to str.isdigit
    ]
    for raw in bad_ids:
        for method in ("GET", "PUT", "PATCH", "DELETE"):
            response = await admin_client.request(method, f"/api/tickets/{raw}/", json=full_put)
            assert response.status_code == 404, (method, raw, response.text)
        response = await admin_client.delete(f"/api/agents/{raw}/")
        assert response.status_code == 404, ("agent", raw, response.text)
    # User ids are 32-bit: a 64-bit one is absent, not an error.
    for raw in (str(2**31), str(2**63 - 1)[:18]):
        response = await admin_client.delete(f"/api/agents/{raw}/")
        assert response.status_code == 404, ("agent", raw, response.text)
    await world.assert_unchanged()


async def test_release_path_ids_that_are_out_of_range_or_not_ids_answer_404(agent_client, world):
    for raw in ("99999999999999999999", str(2**63), "999999999999999999", "-1", "0", "abc", "%00"):
        response = await agent_client.post(f"/api/agent/tickets/{raw}/release/")
        assert response.status_code == 404, (raw, response.text)
        assert "detail" in response.json()
    await world.assert_unchanged()


TICKET_ID_BAD = [2**63, 2**64, -1, 0, "abc", "", 1.5, True, False, None, [], {}, "1 2", "1e3"]


async def test_agent_ticket_id_out_of_range_or_ill_typed_is_refused_with_400(agent_client, world):
    for value in TICKET_ID_BAD:
        response = await agent_client.post(
            "/api/agent/tickets/", json={"ticket_id": value, "status": "resolved"}
        )
        assert response.status_code == 400, (value, response.text)
        assert list(response.json()) == ["ticket_id"], value
    missing = await agent_client.post("/api/agent/tickets/", json={"status": "resolved"})
    assert missing.status_code == 400
    assert list(missing.json()) == ["ticket_id"]
    # The largest 64-bit id is well-formed: it is simply not among the agent's tickets.
    largest = await agent_client.post(
        "/api/agent/tickets/", json={"ticket_id": 2**63 - 1, "status": "resolved"}
    )
    assert largest.status_code == 404, largest.text
    await world.assert_unchanged()


async def test_assigned_to_out_of_range_or_ill_typed_is_refused_with_400(admin_client, world):
    for value in (2**31, 2**63, -5, 0, "x", "", 1.5, True, [], {}):
        for ticket in (world.held, world.open):
            response = await admin_client.patch(
                f"/api/tickets/{ticket}/", json={"title": "changed", "assigned_to": value}
            )
            assert response.status_code == 400, (value, response.text)
            assert list(response.json()) == ["assigned_to"], value
    await world.assert_unchanged()


# Python refuses to convert integers of more than 4300 digits, and its error tells the client
# about sys.set_int_max_str_digits(): no answer may carry that.
HUGE = "9" * 5000


async def test_numbers_of_thousands_of_digits_get_a_clean_answer_anywhere(
    admin_client, agent_client, world
):
    held = f"/api/tickets/{world.held}/"
    raw = [  # in a body, as JSON numbers and as strings
        (
            agent_client,
            "POST",
            "/api/agent/tickets/",
            f'{{"ticket_id": {HUGE}, "status": "closed"}}',
        ),
        (agent_client, "POST", "/api/agent/tickets/", f'{{"ticket_id": -{HUGE}}}'),
        (agent_client, "POST", "/api/agent/tickets/", f'{{"ticket_id": "{HUGE}"}}'),
        (admin_client, "PATCH", held, f'{{"assigned_to": {HUGE}}}'),
        (admin_client, "PATCH", held, f'{{"assigned_to": "{HUGE}"}}'),
        (admin_client, "POST", "/api/tickets/", f'{{"title": {HUGE}}}'),
        (admin_client, "POST", "/api/tickets/", f'{{"title": "t", "priority": {HUGE}}}'),
        (admin_client, "PATCH", f"/api/agents/{world.agent.pk}/", f'{{"is_active": {HUGE}}}'),
    ]
    answers = []
    for client, method, url, body in raw:
        response = await client.request(method, url, content=body.encode(), headers=JSON)
        assert response.status_code == 400, (url, body[:40], response.text[:200])
        answers.append(response)
    for params, status in (  # in the query string
        ({"page": HUGE}, 404),
        ({"page": "-" + HUGE}, 404),
        ({"page_size": "-" + HUGE}, 400),
        ({"assigned_to": HUGE}, 400),
        ({"status": HUGE}, 400),
        ({"priority": HUGE}, 400),
        ({"ordering": HUGE}, 400),
        ({"search": HUGE}, 400),
        ({"cursor": HUGE}, 400),
    ):
        response = await admin_client.get("/api/tickets/", params=params)
        assert response.status_code == status, (params.keys(), response.text[:200])
        answers.append(response)
    for method, url in (  # in the path
        ("GET", f"/api/tickets/{HUGE}/"),
        ("PUT", f"/api/tickets/{HUGE}/"),
        ("PATCH", f"/api/tickets/{HUGE}/"),
        ("DELETE", f"/api/tickets/{HUGE}/"),
        ("GET", f"/api/tickets/{HUGE}/history/"),
        ("GET", f"/api/agents/{HUGE}/"),
        ("PATCH", f"/api/agents/{HUGE}/"),
        ("DELETE", f"/api/agents/{HUGE}/"),
    ):
        response = await admin_client.request(method, url, json={"title": "t"})
        assert response.status_code == 404, (method, url[:30], response.text[:200])
        answers.append(response)
    for response in answers:
        assert response.headers["Content-Type"] == "application/json", response.text[:200]
        assert response.json()
        assert "set_int_max_str_digits" not in response.text, response.text[:300]
        assert "Exceeds the limit" not in response.text, response.text[:300]
    await world.assert_unchanged()


# --- What is judged first: the object, then the body -------------------------------------------
async def test_an_unknown_ticket_is_404_whatever_the_edit_body(admin_client, world):
    """The path's ticket is looked up before the body is read, as DRF's generic views do."""
    unknown = "/api/tickets/987654321/"
    for body in (
        {},
        {"title": "x"},  # incomplete for a PUT
        {"title": 5, "status": "nope", "assigned_to": "x"},
        {"title": "x", "description": "", "priority": "low", "status": "open", "assigned_to": None},
    ):
        for method in ("PUT", "PATCH"):
            response = await admin_client.request(method, unknown, json=body)
            assert response.status_code == 404, (method, body, response.text)
            assert response.json() == {"detail": "No Ticket matches the given query."}
    for kwargs in (
        dict(content=b'{"title": ', headers=JSON),  # malformed JSON
        dict(content=b"[]", headers=JSON),
        dict(data={"title": "x"}),  # not JSON at all
    ):
        response = await admin_client.patch(unknown, **kwargs)
        assert response.status_code == 404, (kwargs, response.text)
    # The same bodies on a ticket that exists: the body is judged.
    incomplete = await admin_client.put(f"/api/tickets/{world.open}/", json={"title": "x"})
    assert incomplete.status_code == 400, incomplete.text
    assert set(incomplete.json()) == {"description", "priority", "status", "assigned_to"}
    await world.assert_unchanged()


async def test_an_unknown_agent_is_404_whatever_the_patch_body(admin_client, world):
    for pk in (987654, world.admin.pk):  # nobody; a user who is not an agent
        for body in ({"is_active": "yes"}, {"is_active": None}, {"is_active": True}):
            response = await admin_client.patch(f"/api/agents/{pk}/", json=body)
            assert response.status_code == 404, (pk, body, response.text)
    await world.assert_unchanged()


async def test_an_agent_move_judges_the_ticket_id_then_the_ticket_then_the_status(
    agent_client, world
):
    cases = [
        # the ticket_id ill-formed: 400 on it, whatever else
        ({"ticket_id": "x", "status": "nope"}, 400, {"ticket_id", "status"}),
        ({"ticket_id": 0}, 400, {"ticket_id", "status"}),
        ({"status": "nope"}, 400, {"ticket_id", "status"}),
        # well-formed, but no ticket of the caller's: 404, whatever the status
        ({"ticket_id": 987654321, "status": "nope"}, 404, {"detail"}),
        ({"ticket_id": 987654321}, 404, {"detail"}),
        ({"ticket_id": world.open, "status": 7}, 404, {"detail"}),
        ({"ticket_id": world.open, "status": "resolved"}, 404, {"detail"}),
        # the caller's ticket: the status is judged
        ({"ticket_id": world.held, "status": "nope"}, 400, {"status"}),
        ({"ticket_id": world.held}, 400, {"status"}),
        ({"ticket_id": world.resolved, "status": "open"}, 400, {"status"}),
    ]
    for body, status, keys in cases:
        response = await agent_client.post("/api/agent/tickets/", json=body)
        assert response.status_code == status, (body, response.text)
        assert set(response.json()) == keys, (body, response.text)
        if status == 404:
            assert response.json() == {"detail": "No such ticket among yours."}
    await world.assert_unchanged()


# --- Unknown choices ---------------------------------------------------------------------------
async def test_unknown_status_and_priority_values_are_refused_with_400(
    admin_client, agent_client, world
):
    held = f"/api/tickets/{world.held}/"
    cases = [
        (admin_client, "POST", "/api/tickets/", {"title": "t", "priority": "critical"}, "priority"),
        (admin_client, "POST", "/api/tickets/", {"title": "t", "priority": "URGENT"}, "priority"),
        (admin_client, "POST", "/api/tickets/", {"title": "t", "priority": 3}, "priority"),
        (admin_client, "POST", "/api/tickets/", {"title": "t", "priority": None}, "priority"),
        (admin_client, "PATCH", held, {"title": "changed", "priority": ""}, "priority"),
        (admin_client, "PATCH", held, {"title": "changed", "status": "pending"}, "status"),
        (admin_client, "PATCH", held, {"title": "changed", "status": "OPEN"}, "status"),
        (admin_client, "PATCH", held, {"title": "changed", "status": None}, "status"),
        (admin_client, "PATCH", held, {"title": "changed", "status": ["open"]}, "status"),
    ]
    for status in ("open", "assigned", "pending", "RESOLVED", "", None, 1):
        body = {"ticket_id": world.held, "status": status}
        cases.append((agent_client, "POST", "/api/agent/tickets/", body, "status"))
    cases.append((agent_client, "POST", "/api/agent/tickets/", {"ticket_id": world.held}, "status"))
    for client, method, url, body, field in cases:
        response = await client.request(method, url, json=body)
        assert response.status_code == 400, (url, body, response.text)
        assert list(response.json()) == [field], (url, body, response.text)
    await world.assert_unchanged()


@pytest.mark.smoke
async def test_unknown_list_filters_are_refused_with_400(admin_client, world):
    for params, field in (
        ({"status": "nope"}, "status"),
        ({"status": ["open", "nope"]}, "status"),
        ({"priority": "x"}, "priority"),
        ({"priority": "3"}, "priority"),
        ({"ordering": "bogus"}, "ordering"),
        ({"ordering": "created_at,bogus"}, "ordering"),
        ({"ordering": "description"}, "ordering"),
        ({"ordering": "created_by__password"}, "ordering"),
        ({"assigned_to": "abc"}, "assigned_to"),
        ({"assigned_to": "0"}, "assigned_to"),
        ({"assigned_to": "-1"}, "assigned_to"),
        ({"assigned_to": str(2**31)}, "assigned_to"),
        ({"page_size": "abc"}, "page_size"),
        ({"page_size": "0"}, "page_size"),
        ({"page_size": "-1"}, "page_size"),
        ({"page_size": "1.5"}, "page_size"),
        ({"page_size": "\u00b2"}, "page_size"),  # a digit to isdigit(), not to int()
        ({"page_size": "0" * 30}, "page_size"),
        ({"page_size": "-" + "9" * 30}, "page_size"),
        ({"page_size": "+5"}, "page_size"),
        ({"search": "s" * 201}, "search"),
        ({"search": "ab"}, "search"),  # too short for the search index
        ({"search": "%_%"}, "search"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "", "page": "1"}, "cursor"),
        ({"cursor": "", "ordering": "id"}, "cursor"),
    ):
        response = await admin_client.get("/api/tickets/", params=params)
        assert response.status_code == 400, (params, response.text)
        assert field in response.json(), (params, response.text)
    await world.assert_unchanged()


async def test_pages_that_do_not_exist_answer_404(admin_client, world):
    for page in (
        "abc",
        "999",
        "0",
        "-1",
        "1.5",
        "2",
        "9" * 30,
        "\u00b2",
        "\u0663",
        "LAST",
        "last ",
    ):
        response = await admin_client.get("/api/tickets/", params={"page": page})
        assert response.status_code == 404, (page, response.text)
        assert "detail" in response.json()
    # The last page exists: 5 tickets at 2 a page make 3 pages.
    last = await admin_client.get("/api/tickets/", params={"page": "3", "page_size": "2"})
    assert last.status_code == 200
    assert len(last.json()["results"]) == 1
    await world.assert_unchanged()


# --- Size, method, path ------------------------------------------------------------------------
LIMIT = settings.MAX_REQUEST_BODY_BYTES


def json_body_of_size(size: int) -> bytes:
    """A valid ticket body of exactly ``size`` bytes (its description is far too long)."""
    head, tail = b'{"title": "big", "description": "', b'"}'
    return head + b"d" * (size - len(head) - len(tail)) + tail


@pytest.mark.smoke
async def test_body_over_the_limit_with_content_length_is_refused_with_413(
    make_client, admin_client, world
):
    assert LIMIT == 1024 * 1024
    body = json_body_of_size(LIMIT + 1)
    for client, url in (
        (admin_client, "/api/tickets/"),
        (make_client(), "/api/auth/token/"),
        (make_client(), "/api/tickets/"),  # refused before authentication
    ):
        response = await client.post(url, content=body, headers=JSON)
        assert response.status_code == 413, (url, response.text)
        assert response.json() == {"detail": "Request body too large."}
    await world.assert_unchanged()


async def test_body_at_the_limit_is_read_and_validated(admin_client, world):
    response = await admin_client.post(
        "/api/tickets/", content=json_body_of_size(LIMIT), headers=JSON
    )
    assert response.status_code == 400, response.text  # not 413: the field is what is wrong
    assert list(response.json()) == ["description"]
    await world.assert_unchanged()


# gc.collect() at the end: had Django's body buffer been left open, the ResourceWarning would
# surface here (warnings are errors) rather than in a later test.
@pytest.mark.smoke
async def test_chunked_body_over_the_limit_without_content_length_is_refused_with_413(
    admin_client, world
):
    chunk = 64 * 1024
    body = json_body_of_size(4 * LIMIT)
    sent = []

    async def chunks():
        for start in range(0, len(body), chunk):
            sent.append(start)
            yield body[start : start + chunk]

    response = await admin_client.post("/api/tickets/", content=chunks(), headers=JSON)
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 413, response.text
    assert response.json() == {"detail": "Request body too large."}
    # Reading stopped just past the limit: the rest of the body was never pulled.
    assert len(sent) <= LIMIT // chunk + 2 < len(body) // chunk
    await world.assert_unchanged()
    gc.collect()


async def test_wrong_methods_are_refused_with_405(make_client, admin_client, agent_client, world):
    cases = [
        (admin_client, "DELETE", "/api/tickets/", "GET, POST, HEAD, OPTIONS"),
        (admin_client, "PUT", "/api/tickets/", "GET, POST, HEAD, OPTIONS"),
        (admin_client, "POST", f"/api/tickets/{world.held}/", None),
        (admin_client, "PATCH", "/api/agents/", None),
        (
            admin_client,
            "PUT",
            f"/api/agents/{world.agent.pk}/",
            "GET, PATCH, DELETE, HEAD, OPTIONS",
        ),
        (admin_client, "POST", f"/api/agents/{world.agent.pk}/", None),
        (agent_client, "PUT", "/api/agent/tickets/", "GET, POST, HEAD, OPTIONS"),
        (agent_client, "DELETE", "/api/agent/tickets/", None),
        (agent_client, "GET", f"/api/agent/tickets/{world.held}/release/", "POST, OPTIONS"),
        (agent_client, "PUT", f"/api/agent/tickets/{world.held}/release/", "POST, OPTIONS"),
        (make_client(), "GET", "/api/auth/token/", "POST, OPTIONS"),
    ]
    for client, method, url, allow in cases:
        response = await client.request(method, url)
        assert response.status_code == 405, (method, url, response.text)
        assert response.json() == {"detail": f'Method "{method}" not allowed.'}
        assert method not in response.headers["Allow"]
        if allow is not None:
            assert response.headers["Allow"] == allow
    await world.assert_unchanged()


@pytest.mark.smoke
async def test_unknown_paths_answer_404_json(make_client, admin_client, world):
    paths = [
        "/api/nope/",
        "/api/",
        "/api/tickets",  # no trailing slash: no redirect that would drop a body
        "/api/tickets/1/extra/",
        "/api/agent/",
        "/nope/",
    ]
    for client in (make_client(), admin_client):
        for path in paths:
            for method in ("GET", "POST"):
                response = await client.request(method, path, json={"title": "t"})
                assert response.status_code == 404, (method, path, response.text)
                assert response.json() == {"detail": "Not found."}
    await world.assert_unchanged()
