"""Hostile input: schemathesis fuzzes every operation of the served OpenAPI schema.

The schema is the one the app serves (``/api/schema/?format=json``), loaded and exercised
through the ASGI application in-process (schemathesis' ASGI transport runs the app on its own
event-loop thread; the views' database work runs in worker threads, so the data is committed).
Each operation is fuzzed twice, with an admin's token and with an agent's, with data that fits
the schema and data that breaks it. Every answer must:

- not be a server error (5xx);
- have a status code the schema documents for that operation;
- have a content type the schema documents for that status;
- have a body that matches the schema documented for that status;
- carry the headers the schema documents, and ``WWW-Authenticate: Token`` on a 401 (the
  contract's header, which the schema's description names but cannot type).

Generation is steered towards data that resolves: schema-conforming cases often get the id of
a seeded ticket or agent, one of the agent's own tickets, or the real credentials, so the
fuzzing reaches the 200/201/204/409 paths and not only the 404s and 400s. After each
operation's run the four guarantees still hold (tests.invariants).

The safe-retry headers the schema documents (Idempotency-Key, If-Match, If-None-Match) are
generated like any optional parameter (about half the cases; the run asserts each was sent),
and steered too: If-Match and If-None-Match often name the targeted ticket's current or an
older ETag, or ``*``; a key already used in the run comes back, with the same request or
another. Beyond the schema's checks:

- a 4xx changes nothing (tests.conftest.db_state), but the key it is stored under;
- a replay (``Idempotent-Replayed``) changes nothing, and is the stored answer of an earlier
  request of the run with that key, the same request (method, path, preconditions, body),
  status and body bytes; a 422 names a key stored for another request; a key stored once is
  never run again (``KeyLedger``); with one request at a time, never a 409 "still running".
"""

import json
import re
from contextlib import suppress
from urllib.parse import unquote, urlsplit

import pytest
import schemathesis
from django.core.cache import cache
from django.test import override_settings
from hypothesis import given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from support import services
from support.models import Ticket
from tests.conftest import create_tickets, create_user, db_state
from tests.invariants import assert_invariants

pytestmark = pytest.mark.django_db(transaction=True)

SCHEMA_PATH = "/api/schema/?format=json"
PASSWORD = "fuzz-pass-phrase-1"
ROLES = ("admin", "agent")
# Examples per (operation, role); with 15 operations x 2 roles the file stays well under 60 s.
MAX_EXAMPLES = 20


def _load_schema():
    from project.asgi import application

    # schemathesis' ASGI client sends "Host: testserver", which pytest-django adds to
    # ALLOWED_HOSTS only when the tests start, after collection.
    with override_settings(ALLOWED_HOSTS=["testserver"]):
        return schemathesis.openapi.from_asgi(SCHEMA_PATH, application)


# Loaded at collection so that every operation the app serves becomes its own test: a new
# route is fuzzed without anyone listing it here.
SCHEMA = _load_schema()
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]


def www_authenticate_on_401(ctx, response, case):
    """The contract: no or bad credentials -> 401 with ``WWW-Authenticate: Token``."""
    if response.status_code == 401:
        values = response.headers.get("www-authenticate")
        assert values == ["Token"], (
            f"{case.operation.label} answered 401 with WWW-Authenticate {values!r}"
        )


def retry_after_on_429_and_503(ctx, response, case):
    """The schema's descriptions: 429 and 503 come with ``Retry-After`` (seconds)."""
    if response.status_code in (429, 503):
        values = response.headers.get("retry-after") or []
        assert len(values) == 1, (
            f"{case.operation.label}: {response.status_code} without Retry-After"
        )
        assert values[0].isdigit(), f"{case.operation.label}: Retry-After {values[0]!r}"


def etag_names_the_ticket(ctx, response, case):
    """support.api.conditional: a ticket answer's ETag is ``"<id>.<version>"`` of the ticket
    it carries; a 412 and a 304 always say the current one."""
    values = response.headers.get("etag") or []
    label = f"{case.operation.label}: {response.status_code}"
    if response.status_code in (304, 412):
        assert len(values) == 1, f"{label} without ETag"
        assert re.fullmatch(r'"[0-9]+\.[0-9]+"', values[0]), f"{label} with ETag {values[0]!r}"
    if values and response.status_code < 300:
        body = response.json()
        assert values == [f'"{body["id"]}.{body["version"]}"'], f"{label}: ETag {values}, {body}"


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    www_authenticate_on_401,
    retry_after_on_429_and_503,
    etag_names_the_ticket,
]


class Seeded:
    """Users and tickets in every state, committed, so generated ids resolve some of the time."""

    def __init__(self):
        self.admin = create_user(staff=True, password=PASSWORD)
        self.agent = create_user(agent=True, password=PASSWORD)
        self.other_agent = create_user(agent=True, password=PASSWORD)
        tickets = []
        for priority in range(4):
            tickets += create_tickets(self.admin, 6, priority=priority)
        # The agent holds the cap (15); some of them resolved or closed.
        held = services.tickets_top_up(agent_id=self.agent.pk)
        for row in held[:3]:
            services.ticket_transition_by_agent(
                agent_id=self.agent.pk, ticket_id=row["id"], to_status="resolved"
            )
        services.ticket_transition_by_agent(
            agent_id=self.agent.pk, ticket_id=held[0]["id"], to_status="closed"
        )
        # The other agent holds three by an admin's hand; the rest stay in the pool.
        held_ids = {row["id"] for row in held}
        pool = [t.pk for t in tickets if t.pk not in held_ids]
        for ticket_id in pool[:3]:
            services.ticket_update(
                ticket_id=ticket_id,
                changes={"assigned_to": self.other_agent.pk},
                actor_id=self.admin.pk,
            )
        self.ticket_ids = [t.pk for t in tickets]
        self.agent_held_ids = [row["id"] for row in held]
        self.agent_ids = [self.agent.pk, self.other_agent.pk]
        self.user_ids = [self.admin.pk, *self.agent_ids]

    def user(self, role):
        return self.admin if role == "admin" else self.agent


@pytest.fixture
def seeded():
    cache.clear()  # login throttling counters: start from none, leave none behind
    yield Seeded()
    cache.clear()


SAFE_RETRY_HEADERS = ("Idempotency-Key", "If-Match", "If-None-Match")
CHECK_REFUSALS = (401, 403, 429)  # refused before the key is read: never stored


def _replayed(response) -> bool:
    return response.headers.get("idempotent-replayed") == ["true"]


def _same_request(request) -> tuple:
    """What makes a request the same request for its key (support.api.idempotency's
    fingerprint): method, path, If-Match, If-None-Match, and the body, a JSON one as data."""
    body = request.body or b""
    if isinstance(body, str):
        body = body.encode()
    with suppress(ValueError, RecursionError):
        body = json.dumps(
            json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    path = unquote(urlsplit(request.url).path)
    headers = request.headers
    return (request.method, path, headers.get("If-Match", ""), headers.get("If-None-Match"), body)


class KeyLedger:
    """The Idempotency-Keys one run (one user, one operation) sent, and the answer stored
    under each."""

    def __init__(self, operation, label: str):
        self.label = label
        self.keyed = "Idempotency-Key" in {parameter.name for parameter in operation.headers}
        # the operation's route (support.api.urls: ids are 1 to 18 digits); a path that
        # misses it never reaches the view, nor its key
        self.route = re.compile(re.escape(operation.path).replace(r"\{id\}", "[0-9]{1,18}"))
        self.stored: dict[str, tuple] = {}  # key -> (request, status, body)

    def key_of(self, response) -> str | None:
        """The key the answer is stored, or replayed, under; None when it has none."""
        raw = response.request.headers.get("Idempotency-Key")
        if raw is None or not self.keyed:
            return None
        if not self.route.fullmatch(_same_request(response.request)[1]):
            return None
        if response.status_code == 400 and "Idempotency-Key" in (response.json() or {}):
            return None  # malformed: refused, stored nowhere
        return raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] == '"' else raw

    def check(self, response) -> None:
        label, status = self.label, response.status_code
        in_use = status == 409 and "retry-after" in response.headers
        key = self.key_of(response)
        if key is None:
            assert not _replayed(response), f"{label}: a replay without a key"
            assert not in_use, f"{label}: 'still running' without a key"
            return
        request = _same_request(response.request)
        stored = self.stored.get(key)
        assert not in_use, f"{label}: key {key!r} 'still running' with nothing else running"
        if _replayed(response):
            assert stored == (request, status, response.content), (
                f"{label}: key {key!r} replayed {status} {response.content[:200]!r} for {stored}"
            )
        elif status == 422:
            assert stored is not None, f"{label}: 422 for key {key!r} that nothing stored"
            assert stored[0] != request, f"{label}: 422 for the same request under {key!r}"
        elif status not in CHECK_REFUSALS and status < 500:
            assert stored is None, (
                f"{label}: key {key!r} ran again ({status} {response.content[:200]!r}, "
                f"{response.request.headers}) after it stored {stored}"
            )
            self.stored[key] = (request, status, response.content)


def _without_keys(state: dict) -> dict:
    return {table: rows for table, rows in state.items() if table != "idempotency_keys"}


def _stored_keys(state: dict) -> set[tuple[int, str]]:
    return {(row["user_id"], row["key"]) for row in state["idempotency_keys"]}


def _changed_nothing_if_refused(before: dict, response, user, ledger: KeyLedger) -> None:
    """A 4xx, or a replay, changes nothing; a 4xx of the work is stored under its key alone."""
    replay = _replayed(response)
    if not (400 <= response.status_code < 500 or replay):
        return
    after = db_state()
    label = f"{ledger.label}: {response.status_code}"
    assert _without_keys(after) == _without_keys(before), f"{label} changed data"
    added = _stored_keys(after) - _stored_keys(before)
    assert _stored_keys(before) <= _stored_keys(after), f"{label} dropped a stored key"
    key = None if replay else ledger.key_of(response)
    allowed = {(user.pk, key)} if key is not None else set()
    assert added <= allowed, f"{label} stored {added} (allowed: {allowed})"


def _target_ticket(case) -> int | None:
    """The ticket a conditional request names: its path id, or a move's ticket_id."""
    if case.operation.path in ("/api/tickets/{id}/", "/api/agent/tickets/{id}/release/"):
        ticket = (case.path_parameters or {}).get("id")
    elif isinstance(case.body, dict):
        ticket = case.body.get("ticket_id")
    else:
        ticket = None
    return ticket if isinstance(ticket, int) and not isinstance(ticket, bool) else None


def _steer(case, seeded: Seeded, role: str, data, ledger: KeyLedger) -> None:
    """Sometimes swap generated ids and credentials for ones that exist, preconditions for
    the targeted ticket's ETags, a key for one the run already stored."""

    def sometimes(choices):
        # The same draws whatever the database holds (``choices`` may be empty, or change as
        # the run deletes and creates): hypothesis replays an example by its draws.
        use = data.draw(st.booleans(), label="use a seeded value")
        index = data.draw(st.integers(0, 2**16), label="seeded value")
        return choices[index % len(choices)] if use and choices else None

    path = case.operation.path
    if "id" in (case.path_parameters or {}):
        if path.startswith("/api/agents/"):
            ids = seeded.agent_ids
        elif path.startswith("/api/agent/tickets/"):  # a hand-back: the agent's own (200, 409)
            ids = seeded.agent_held_ids
        else:
            ids = seeded.ticket_ids
        choice = sometimes(ids)
        if choice is not None:
            case.path_parameters["id"] = choice
    if isinstance(case.query, dict) and "assigned_to" in case.query:
        choice = sometimes(seeded.agent_ids)
        if choice is not None:
            case.query["assigned_to"] = choice
    body = case.body
    if isinstance(body, dict):
        if "ticket_id" in body:
            choice = sometimes(seeded.agent_held_ids)
            if choice is not None:
                body["ticket_id"] = choice
        if body.get("assigned_to") is not None:
            choice = sometimes(seeded.user_ids)
            if choice is not None:
                body["assigned_to"] = choice
        if path == "/api/auth/token/" and "username" in body:
            user = seeded.user(role)
            if data.draw(st.booleans(), label="real credentials"):
                body["username"] = user.username
                body["password"] = PASSWORD

    names = {parameter.name for parameter in case.operation.headers}
    headers = dict(case.headers or {})
    ticket = _target_ticket(case)
    version = None
    if ticket is not None and 0 < ticket < 2**63:
        version = Ticket.objects.filter(pk=ticket).values_list("version", flat=True).first()
    tags = []
    if version is not None:
        current, older = f'"{ticket}.{version}"', f'"{ticket}.{version - 1}"'
        tags = [current, older, "*", f"{older}, {current}", f"W/{current}"]
    for name in sorted(names & {"If-Match", "If-None-Match"}):
        choice = sometimes(tags)
        if choice is not None:
            headers[name] = choice
    if "Idempotency-Key" in names:
        choice = sometimes(sorted(ledger.stored))
        if choice is not None:
            headers["Idempotency-Key"] = choice
    case.headers = headers


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_every_answer_conforms_to_the_schema(operation, role, seeded):
    user = seeded.user(role)
    auth = {"Authorization": f"Token {user.token}"}
    documented = {parameter.name for parameter in operation.headers}
    ledger = KeyLedger(operation, f"{operation.label} as {role}")
    sent: set[str] = set()
    modes = {
        mode: operation.as_strategy(generation_mode=mode)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    }

    answered: set[int] = set()

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,  # the same cases on every run
        database=None,  # nothing carried over between runs either
        deadline=None,  # answers wait on the database; their time is not the property here
    )
    @given(data=st.data())
    def fuzz(data):
        mode = data.draw(st.sampled_from(list(modes)), label="generation mode")
        case = data.draw(modes[mode], label="case")
        if mode is GenerationMode.POSITIVE:
            _steer(case, seeded, role, data, ledger)
        before = db_state()
        response = case.call_and_validate(headers=auth, checks=CHECKS)
        answered.add(response.status_code)
        sent.update(name for name in SAFE_RETRY_HEADERS if name in response.request.headers)
        ledger.check(response)
        _changed_nothing_if_refused(before, response, user, ledger)

    fuzz()
    # Not a vacuous pass: the token was accepted at least once (all-401 would conform too),
    # and every safe-retry header the operation documents was sent.
    assert answered - {401}, f"{operation.label} as {role}: every answer was 401"
    missing = documented.intersection(SAFE_RETRY_HEADERS) - sent
    assert not missing, f"{operation.label} as {role}: never sent {missing}"
    assert_invariants()
