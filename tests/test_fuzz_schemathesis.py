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
"""

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
from tests.conftest import create_tickets, create_user
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


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    www_authenticate_on_401,
    retry_after_on_429_and_503,
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


def _steer(case, seeded: Seeded, role: str, data) -> None:
    """Sometimes swap generated ids and credentials for ones that exist."""

    def sometimes(choices):
        if data.draw(st.booleans(), label="use a seeded value"):
            return data.draw(st.sampled_from(choices), label="seeded value")
        return None

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


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_every_answer_conforms_to_the_schema(operation, role, seeded):
    auth = {"Authorization": f"Token {seeded.user(role).token}"}
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
            _steer(case, seeded, role, data)
        response = case.call_and_validate(headers=auth, checks=CHECKS)
        answered.add(response.status_code)

    fuzz()
    # Not a vacuous pass: the token was accepted at least once (all-401 would conform too).
    assert answered - {401}, f"{operation.label} as {role}: every answer was 401"
    assert_invariants()
