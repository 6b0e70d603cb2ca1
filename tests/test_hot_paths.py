"""The hot endpoints' cost, pinned: statements per request (token check included), one thread
hop per request, and query plans that stay on their indexes as history grows.

Timings live in the benchmark (bench/); these are the counts and plans a regression would
change, so it fails CI instead.
"""

import json

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, transaction
from django.db.models import Q
from django.db.transaction import TransactionManagementError
from django.test import Client
from django.test.utils import CaptureQueriesContext
from rest_framework.exceptions import NotFound
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.test import APIRequestFactory

from support import services
from support.api.views import APIView
from support.models import Ticket, TicketAssignment
from support.prepared import Prepared
from tests.conftest import create_tickets, create_user
from tests.invariants import assert_invariants

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

    # token, held assignments (none: not at the cap, so:); BEGIN, lock the agent, held
    # assignments again, pick, mark, assignments, events, COMMIT
    status, sql = _call(client, agent, "GET", "/api/agent/tickets/")
    assert (status, len(sql)) == (200, 10), sql
    # poll at the cap: token, held assignments, their tickets; no transaction, no lock
    status, sql = _call(client, agent, "GET", "/api/agent/tickets/")
    assert (status, len(sql)) == (200, 3), sql
    assert not any("FOR NO KEY UPDATE" in q or q == "BEGIN" for q in sql)

    held = services.held_tickets(agent.pk)[0]["id"]
    # token; BEGIN, lock the agent, lock the ticket with its holder, update it, mark its
    # assignment as no longer counting toward the cap, event, COMMIT
    move = {"ticket_id": held, "status": "resolved"}
    status, sql = _call(client, agent, "POST", "/api/agent/tickets/", move)
    assert (status, len(sql)) == (200, 8), sql
    # resolved -> closed: the same without the assignment's update
    move = {"ticket_id": held, "status": "closed"}
    status, sql = _call(client, agent, "POST", "/api/agent/tickets/", move)
    assert (status, len(sql)) == (200, 7), sql
    # the churn's fetch, one short: token, held assignments; BEGIN, lock, held assignments,
    # their tickets, pick, mark, assignments, events, COMMIT
    status, sql = _call(client, agent, "GET", "/api/agent/tickets/")
    assert (status, len(sql)) == (200, 11), sql

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


class _RaisesUnchecked(APIView):
    permission_classes = [AllowAny]

    async def get(self, request):
        raise NotFound("answered before the checks")


class _Checked(APIView):
    permission_classes = [AllowAny]

    async def get(self, request):
        return await self.in_thread(lambda: Response({"user": str(request.user)}))


@pytest.mark.smoke
async def test_a_handler_that_skips_the_checks_is_refused_not_served():
    request = APIRequestFactory().get("/")
    with pytest.raises(ImproperlyConfigured, match="without in_thread"):
        await _Unchecked.as_view()(request)
    with pytest.raises(ImproperlyConfigured, match="without in_thread"):
        await _RaisesUnchecked.as_view()(APIRequestFactory().get("/"))
    response = await _Checked.as_view()(APIRequestFactory().get("/"))
    assert response.status_code == 200
    assert response.data == {"user": "AnonymousUser"}  # authentication ran


# --- Query plans: cost that does not grow with history ---------------------------------------
def _plan(queryset) -> dict:
    """EXPLAIN ANALYZE of a queryset, in a transaction rolled back (a locking query locks)."""
    with transaction.atomic(), connection.cursor() as cursor:
        sql, params = queryset.query.sql_with_params()
        cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", params)
        plan = cursor.fetchone()[0]
        transaction.set_rollback(True)
    return (json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]


def _nodes(plan: dict) -> list[dict]:
    return [plan, *(n for child in plan.get("Plans", []) for n in _nodes(child))]


def _history(admin, agent, count: int) -> None:
    """``count`` closed tickets the agent worked (their assignments stay, as the record)."""
    closed = create_tickets(admin, count, status=Ticket.Status.CLOSED)
    TicketAssignment.objects.bulk_create(
        TicketAssignment(ticket=t, agent=agent, holding=False) for t in closed
    )


def _analyze() -> None:
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE support_ticket, support_ticketassignment")


def test_held_list_reads_only_the_held_rows_however_long_the_history():
    """ "What do I hold" reads the agent's 15 held assignments from
    assignment_agent_holding_idx, then those 15 tickets by primary key: an agent's thousands
    of closed tickets are never visited, with fresh statistics or with statistics taken before
    the history existed (as between autovacuums during fast churn)."""
    if connection.vendor != "postgresql":
        pytest.fail("query plans are PostgreSQL's: run on PostgreSQL")
    admin = create_user(staff=True)
    agent, other = create_user(agent=True), create_user(agent=True)
    old = create_tickets(admin, 8000, status=Ticket.Status.CLOSED)  # the held come after
    create_tickets(admin, 3000)
    services.tickets_top_up(agent_id=agent.pk)
    services.tickets_top_up(agent_id=other.pk)
    _analyze()  # statistics from before the history
    TicketAssignment.objects.bulk_create(
        TicketAssignment(ticket=t, agent=(agent, other)[n % 2], holding=False)
        for n, t in enumerate(old)
    )

    for moment in ("stale statistics", "fresh statistics"):
        held = services.held_assignments_query(agent.pk)
        ids = [pk for pk, _ in held]
        tickets = services._held_by_id(agent.pk, *ids)
        by_key = {"support_ticket_pkey", "one_active_assignment_per_ticket"}
        for query, indexes in (
            (held, {"assignment_agent_holding_idx"}),
            (tickets, by_key | {"assignment_agent_holding_idx"}),
        ):
            nodes = _nodes(_plan(query))
            assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], (moment, nodes)
            used = {n["Index Name"] for n in nodes if "Index Name" in n}
            assert used <= indexes, (moment, used)
            for table in {n["Relation Name"] for n in nodes if "Relation Name" in n}:
                read = [
                    n["Actual Rows"] * n["Actual Loops"]
                    for n in nodes
                    if n.get("Relation Name") == table
                ]
                assert max(read) == 15, (moment, table, nodes)
        assert len(services.held_tickets(agent.pk)) == 15
        _analyze()


def test_pool_pick_and_admin_page_read_their_indexes():
    if connection.vendor != "postgresql":
        pytest.fail("query plans are PostgreSQL's: run on PostgreSQL")
    admin = create_user(staff=True)
    create_tickets(admin, 3000)
    _history(admin, create_user(agent=True), 3000)
    _analyze()

    pick = (
        Ticket.objects.select_for_update(skip_locked=True, no_key=True)
        .filter(status=Ticket.Status.OPEN)
        .order_by("-priority", "created_at", "id")
        .values("id")[:15]
    )
    nodes = _nodes(_plan(pick))
    scans = [n for n in nodes if n.get("Relation Name") == "support_ticket"]
    assert [n.get("Index Name") for n in scans] == ["ticket_pool_idx"], scans
    assert scans[0]["Actual Rows"] == 15  # the first 15 in pick order, no sort of the pool

    page = services.ticket_rows(services.tickets_with_holder().order_by("-created_at", "-id"))
    nodes = _nodes(_plan(page[:20]))
    scans = [n for n in nodes if n.get("Relation Name") == "support_ticket"]
    assert [n.get("Index Name") for n in scans] == ["ticket_newest_idx"], scans
    assert scans[0]["Actual Rows"] == 20


# --- Prepared queries: the ORM's SQL, compiled once -------------------------------------------
@pytest.mark.smoke
def test_a_prepared_query_answers_what_the_orm_answers():
    admin = create_user(staff=True)
    agent = create_user(agent=True)
    create_tickets(admin, 20)
    services.tickets_top_up(agent_id=agent.pk)
    for pk in (agent.pk, admin.pk, 0):
        rows = services.held_assignments(pk)
        assert rows == list(services.held_assignments_query(pk))
    assert len(services.held_assignments(agent.pk)) == 15
    # datetimes come back as the ORM gives them on either backend (converters applied)
    assert all(at.tzinfo is not None for _, at in services.held_assignments(agent.pk))
    # and the held rows equal a plain ORM read of the same tickets
    expected = services.ticket_rows(
        services.tickets_with_holder().filter(active__agent_id=agent.pk)
    ).order_by("active__assigned_at", "id")
    assert services.held_tickets(agent.pk) == list(expected)


@pytest.mark.smoke
def test_a_prepared_locking_query_refuses_to_run_outside_a_transaction():
    agent = create_user(agent=True)
    with transaction.atomic():
        assert services._LOCK_ONE_USER.rows(pk=agent.pk) == [(agent.pk, True, True)]
    with pytest.raises(TransactionManagementError):
        services._LOCK_ONE_USER.rows(pk=agent.pk)


@pytest.mark.smoke
def test_a_value_that_is_not_one_plain_parameter_is_refused():
    twice = Prepared(
        lambda pk: Ticket.objects.filter(Q(pk=pk) | Q(created_by_id=pk)).values_list("id"),
        pk=int,
    )
    with pytest.raises(ValueError, match="not one plain SQL parameter"):
        twice.rows(pk=1)


@pytest.mark.smoke
def test_a_poll_whose_two_reads_disagree_answers_from_the_locked_path(monkeypatch):
    """Between the poll's two plain reads the agent resolves one of its tickets (simulated by
    handing the poll its first read from just before): the second read no longer finds all of
    them held, so the answer comes from the locked top-up, never a mix of two moments."""
    admin = create_user(staff=True)
    agent = create_user(agent=True)
    create_tickets(admin, 40)
    first = services.tickets_top_up(agent_id=agent.pk)
    before = services.held_assignments(agent.pk)
    services.ticket_transition_by_agent(
        agent_id=agent.pk, ticket_id=first[0]["id"], to_status="resolved"
    )
    real, reads = services.held_assignments, []

    def first_read_from_before(agent_id):
        reads.append(agent_id)
        return before if len(reads) == 1 else real(agent_id)

    monkeypatch.setattr(services, "held_assignments", first_read_from_before)
    with CaptureQueriesContext(connection) as ctx:
        answer = services.tickets_top_up(agent_id=agent.pk, role_checked=True)
    # the locked path: it read (on PostgreSQL, locked) the agent's own row
    assert any('FROM "auth_user"' in q["sql"] for q in ctx.captured_queries)
    ids = [row["id"] for row in answer]
    assert len(ids) == 15
    assert first[0]["id"] not in ids  # resolved: not held any more
    assert set(ids) == {pk for pk, _ in real(agent.pk)}
    assert_invariants()
