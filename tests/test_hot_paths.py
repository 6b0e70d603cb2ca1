"""The hot endpoints' cost, pinned: statements per request (token check included), one thread
hop per request, and query plans that stay on their indexes as history grows.

Timings live in the benchmark (bench/); these are the counts and plans a regression would
change, so it fails CI instead.
"""

import json

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.test import APIRequestFactory

from support import services
from support.api.views import APIView
from tests.conftest import create_tickets, create_user

pytestmark = pytest.mark.django_db(transaction=True)


def _call(client: Client, user, method: str, path: str, body=None) -> tuple[int, list[str]]:
    """One request through Django's test client (every statement of it runs in this thread,
    so the capture sees them all): the status and the statements sent."""
    headers = {"HTTP_AUTHORIZATION": f"Token {user.token}"}
    with CaptureQueriesContext(connection) as ctx:
        if method == "GET":
            response = client.get(path, **headers)
        else:
            response = client.generic(
                method, path, json.dumps(body), content_type="application/json", **headers
            )
    return response.status_code, [q["sql"] for q in ctx.captured_queries]


@pytest.mark.smoke
def test_statements_per_request_of_the_hot_endpoints():
    client = Client()
    admin = create_user(staff=True)
    agent = create_user(agent=True)
    create_tickets(admin, 40)

    # token, held list (not at the cap, so:); BEGIN, lock the agent, held list again, pick,
    # mark, assignments, events, COMMIT
    status, sql = _call(client, agent, "GET", "/api/agent/tickets/")
    assert (status, len(sql)) == (200, 10), sql
    # poll at the cap: token, held list; no transaction, no lock
    status, sql = _call(client, agent, "GET", "/api/agent/tickets/")
    assert (status, len(sql)) == (200, 2), sql
    assert not any("FOR NO KEY UPDATE" in q or q == "BEGIN" for q in sql)

    held = services.held_tickets(agent.pk)[0]["id"]
    # token; BEGIN, lock the agent, lock the ticket with its holder, update, event, COMMIT
    move = {"ticket_id": held, "status": "resolved"}
    status, sql = _call(client, agent, "POST", "/api/agent/tickets/", move)
    assert (status, len(sql)) == (200, 7), sql

    # token, count, page
    status, sql = _call(client, admin, "GET", "/api/tickets/?page_size=20")
    assert (status, len(sql)) == (200, 3), sql
    # token; BEGIN, insert the ticket, insert its event, COMMIT
    new = {"title": "Printer jammed", "priority": "high"}
    status, sql = _call(client, admin, "POST", "/api/tickets/", new)
    assert (status, len(sql)) == (201, 5), sql


class _Unchecked(APIView):
    permission_classes = [AllowAny]

    async def get(self, request):
        return Response({"ok": True})  # forgot self.in_thread(...)


class _Checked(APIView):
    permission_classes = [AllowAny]

    async def get(self, request):
        return await self.in_thread(lambda: Response({"user": str(request.user)}))


@pytest.mark.smoke
async def test_a_handler_that_skips_the_checks_is_refused_not_served():
    request = APIRequestFactory().get("/")
    with pytest.raises(ImproperlyConfigured, match="without in_thread"):
        await _Unchecked.as_view()(request)
    response = await _Checked.as_view()(APIRequestFactory().get("/"))
    assert response.status_code == 200
    assert response.data == {"user": "AnonymousUser"}  # authentication ran
