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
from support.models import Ticket
from support.prepared import Prepared
from support.services import locks
from tests.conftest import create_held, create_tickets, create_user

pytestmark = pytest.mark.django_db(transaction=True)


def _call(
    client: Client, user, method: str, path: str, body=None, **extra
) -> tuple[int, list[str]]:
    """One request through Django's test client (every statement of it runs in this thread,
    so the capture sees them all): the status and the statements sent."""
    headers = {"HTTP_AUTHORIZATION": f"Token {user.token}", **extra}
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

    # token, held (none: not at the cap, so:); BEGIN, lock the agent, its role (read after the
    # lock), held again, pick, give them to the agent, their assignments, events, COMMIT
    status, sql = _call(client, agent, "GET", "/api/agent/tickets/")
    assert (status, len(sql)) == (200, 11), sql
    # poll at the cap: token, held; no transaction, no lock
    status, sql = _call(client, agent, "GET", "/api/agent/tickets/")
    assert (status, len(sql)) == (200, 2), sql
    assert not any("FOR NO KEY UPDATE" in q or q == "BEGIN" for q in sql)

    held = services.held_tickets(agent.pk)[0]["id"]
    # token; BEGIN, lock the agent, its role, lock the ticket (its holder is on the row),
    # update it, event, COMMIT
    move = {"ticket_id": held, "status": "resolved"}
    status, sql = _call(client, agent, "POST", "/api/agent/tickets/", move)
    assert (status, len(sql)) == (200, 8), sql
    move = {"ticket_id": held, "status": "closed"}
    status, sql = _call(client, agent, "POST", "/api/agent/tickets/", move)
    assert (status, len(sql)) == (200, 8), sql
    # the churn's fetch, one short: the first fetch's statements
    status, sql = _call(client, agent, "GET", "/api/agent/tickets/")
    assert (status, len(sql)) == (200, 11), sql

    # token, count, page
    status, sql = _call(client, admin, "GET", "/api/tickets/?page_size=20")
    assert (status, len(sql)) == (200, 3), sql
    # token; BEGIN, insert the ticket, insert its event, COMMIT
    new = {"title": "Printer jammed", "priority": "high"}
    status, sql = _call(client, admin, "POST", "/api/tickets/", new)
    assert (status, len(sql)) == (201, 5), sql
    # with an Idempotency-Key: token; BEGIN, try the key's lock, read the key, SAVEPOINT, the
    # ticket, its event, RELEASE, the key with its answer, COMMIT (docs/retries.md)
    key = {"HTTP_IDEMPOTENCY_KEY": "hot-path"}
    status, sql = _call(client, admin, "POST", "/api/tickets/", new, **key)
    assert (status, len(sql)) == (201, 10 if connection.vendor == "postgresql" else 9), sql
    # its retry: token; BEGIN, the lock, the key, COMMIT
    status, sql = _call(client, admin, "POST", "/api/tickets/", new, **key)
    assert (status, len(sql)) == (201, 5 if connection.vendor == "postgresql" else 4), sql


@pytest.mark.smoke
@pytest.mark.parametrize("cap", [15, 40])
def test_a_poll_at_the_cap_is_the_token_check_and_one_statement_for_any_cap(settings, cap):
    settings.SUPPORT_AGENT_MAX_TICKETS = cap
    client = Client()
    admin = create_user(staff=True)
    agent = create_user(agent=True)
    create_tickets(admin, cap + 5)
    status, sql = _call(client, agent, "GET", "/api/agent/tickets/")
    assert status == 200
    status, sql = _call(client, agent, "GET", "/api/agent/tickets/")
    assert status == 200
    assert len(sql) == 2, sql  # the token check, then what the agent holds
    held = [q for q in sql if "support_ticket" in q]
    assert len(held) == 1
    assert " IN (" not in held[0]  # one parameter, the agent: no list of ids
    assert len(services.held_tickets(agent.pk)) == cap


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
    assert json.loads(response.content) == {"user": "AnonymousUser"}  # authentication ran


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
    """``count`` closed tickets the agent worked (their agent stays, as the record)."""
    create_held(admin, agent, count, status=Ticket.Status.CLOSED)


def _analyze() -> None:
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE support_ticket, support_ticketassignment")


def test_held_list_reads_only_the_held_rows_however_long_the_history():
    """ "What do I hold" reads the agent's 15 held tickets from ticket_held_idx: an agent's
    thousands of closed tickets are never visited, with fresh statistics or with statistics
    taken before the history existed (as between autovacuums during fast churn)."""
    if connection.vendor != "postgresql":
        pytest.fail("query plans are PostgreSQL's: run on PostgreSQL")
    admin = create_user(staff=True)
    agent, other = create_user(agent=True), create_user(agent=True)
    create_tickets(admin, 3000)
    services.tickets_top_up(agent_id=agent.pk)
    services.tickets_top_up(agent_id=other.pk)
    _analyze()  # statistics from before the history
    _history(admin, agent, 4000)
    _history(admin, other, 4000)

    for moment in ("stale statistics", "fresh statistics"):
        nodes = _nodes(_plan(services.held_query(agent.pk)))
        assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], (moment, nodes)
        used = {n["Index Name"] for n in nodes if "Index Name" in n}
        assert used == {"ticket_held_idx"}, (moment, used)
        read = [n["Actual Rows"] * n["Actual Loops"] for n in nodes if "Relation Name" in n]
        assert read == [15], (moment, nodes)
        assert not [n for n in nodes if n["Node Type"] == "Sort"], (moment, nodes)
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

    page = services.ticket_rows(Ticket.objects.order_by("-created_at", "-id"))
    nodes = _nodes(_plan(page[:20]))
    scans = [n for n in nodes if n.get("Relation Name") == "support_ticket"]
    assert [n.get("Index Name") for n in scans] == ["ticket_newest_idx"], scans
    assert scans[0]["Actual Rows"] == 20


# --- The admin list on a large table: counts, search, status and cursor pages ----------------
def _seed_list(admin, agent, total: int) -> None:
    """``total`` tickets in one statement, as a long-lived install holds them: most closed,
    every 20th open, every 1000th assigned; titles and descriptions of varied words; created
    ten to a second (so timestamps tie); five descriptions name a zebra."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO support_ticket (title, description, status, priority, created_at,"
            " updated_at, created_by_id, assigned_to_id, assigned_at)"
            " SELECT format('%%s %%s', (ARRAY['Printer', 'VPN', 'Laptop', 'Mail', 'Badge',"
            "  'Phone'])[1 + g %% 6], left(md5(g::text), 12)),"
            " CASE WHEN g %% 10000 = 7 THEN 'A zebra on the loading dock' ELSE"
            "  md5((g * 7)::text) || ' ' || md5((g * 13)::text) END,"
            " s.status, g %% 4, now() - ((%s - g) / 10) * interval '1 second', now(), %s,"
            " CASE WHEN s.status = 'open' THEN NULL ELSE %s END,"
            " CASE WHEN s.status = 'open' THEN NULL ELSE now() END"
            " FROM generate_series(1, %s) g, LATERAL (SELECT CASE WHEN g %% 20 = 0 THEN 'open'"
            "  WHEN g %% 1000 = 1 THEN 'assigned' ELSE 'closed' END AS status) s",
            [total, admin.pk, agent.pk, total],
        )
    with connection.cursor() as cursor:  # fresh statistics; the search indexes' pending
        cursor.execute("VACUUM ANALYZE support_ticket")  # entries merged, as autovacuum does


def _read_from_tickets(plan: dict) -> int:
    """Rows the plan read from the ticket table or its indexes, kept or thrown away."""
    read = 0
    for node in _nodes(plan):
        if node.get("Relation Name") == "support_ticket" or node.get("Index Name"):
            loops = node.get("Actual Loops", 1)
            read += node["Actual Rows"] * loops
            read += node.get("Rows Removed by Filter", 0) + node.get(
                "Rows Removed by Index Recheck", 0
            )
    return read


def _list_statements(client, admin, query: str) -> tuple[dict, list[str]]:
    status, sql = _call(client, admin, "GET", f"/api/tickets/?{query}")
    assert status == 200, (query, sql)
    body = client.get(f"/api/tickets/?{query}", HTTP_AUTHORIZATION=f"Token {admin.token}").json()
    return body, [q for q in sql if "support_ticket" in q and "support_apitoken" not in q]


def _explain(sql: str) -> dict:
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}")
        plan = cursor.fetchone()[0]
    return (json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]


def test_the_admin_list_reads_a_bounded_number_of_rows_on_a_large_table(settings):
    """50,000 tickets: the count from the counters (the ticket table untouched), a search
    through its trigram indexes, a status page and cursor pages deep in the list, each reading
    a few dozen rows at most: the statements the API sent, EXPLAINed as sent."""
    if connection.vendor != "postgresql":
        pytest.fail("query plans are PostgreSQL's: run on PostgreSQL")
    client = Client()
    admin = create_user(staff=True)
    agent = create_user(agent=True)
    _seed_list(admin, agent, 50_000)

    body, sql = _list_statements(client, admin, "")
    assert (body["count"], body["count_exact"]) == (50_000, True)
    counted = [q for q in sql if "support_ticket_count" in q]
    assert (len(counted), len(sql)) == (1, 2), sql  # the counters, then the page

    cases = {  # query: (count, most rows read)
        "search=ZEBRA": (5, 100),
        "status=open": (2500, 100),
        "status=assigned": (50, 100),
        "priority=normal&status=assigned": (50, 100),
        # several statuses: the newest-first index, keeping the matching tickets (about 20
        # divided by their share of all tickets), or the status index and a sort, whichever
        # the statistics say is cheaper
        "status=open&status=assigned": (2550, 1000),
    }
    # 47,500 tickets of the agent's: counted up to the limit, and no further
    settings.SUPPORT_LIST_COUNT_LIMIT = 1000
    cases[f"assigned_to={agent.pk}"] = (1000, 1100)  # 1001, and the open ones it passed
    for query, (count, most) in cases.items():
        body, sql = _list_statements(client, admin, query)
        exact = not query.startswith("assigned_to")
        assert (body["count"], body["count_exact"]) == (count, exact), query
        assert len(body["results"]) == min(count, 20), query
        for statement in sql:
            if "support_ticket_count" in statement:
                continue  # the counters: 32 rows, no ticket read
            # rows kept and thrown away: a scan of every ticket cannot hide here
            plan = _explain(statement)
            assert _read_from_tickets(plan) <= most, (query, statement, plan)

    # cursor pages in the middle of the list, with and without a filter
    # (a common word, in a sixth of the tickets: the newest-first index, keeping the matches)
    for query, most in (
        ("cursor=", 21),
        ("cursor=&status=open", 100),
        ("cursor=&search=printer", 200),
    ):
        url = query
        for _ in range(3):
            body, _ = _list_statements(client, admin, url)
            url = body["next"].split("?", 1)[1]
        body, sql = _list_statements(client, admin, url)
        assert len(body["results"]) == 20, query
        [page] = [q for q in sql if "LIMIT 21" in q]
        plan = _explain(page)
        scans = [n for n in _nodes(plan) if n.get("Relation Name") == "support_ticket"]
        assert not [n for n in scans if n["Node Type"] == "Seq Scan"], (query, plan)
        if query == "cursor=":
            assert [n.get("Index Name") for n in scans] == ["ticket_newest_idx"], plan
            assert ("Index Cond" in scans[0], "Filter" in scans[0]) == (True, False), scans[0]
        assert _read_from_tickets(plan) <= most, (query, page, plan)


# --- Prepared queries: the ORM's SQL, compiled once -------------------------------------------
@pytest.mark.smoke
def test_a_prepared_query_answers_what_the_orm_answers():
    admin = create_user(staff=True)
    agent = create_user(agent=True)
    create_tickets(admin, 20)
    services.tickets_top_up(agent_id=agent.pk)
    for pk in (agent.pk, admin.pk, 0):
        expected = list(services.ticket_rows(services.held_query(pk)))
        assert services.held_tickets(pk) == expected
    held = services.held_tickets(agent.pk)
    assert len(held) == 15
    # datetimes come back as the ORM gives them on either backend (converters applied)
    assert all(row["assigned_at"].tzinfo is not None for row in held)


@pytest.mark.smoke
def test_a_prepared_locking_query_refuses_to_run_outside_a_transaction():
    agent = create_user(agent=True)
    with transaction.atomic():
        assert locks._LOCK_ONE_USER.rows(pk=agent.pk) == [(agent.pk, True)]
    with pytest.raises(TransactionManagementError):
        locks._LOCK_ONE_USER.rows(pk=agent.pk)


@pytest.mark.smoke
def test_a_value_that_is_not_one_plain_parameter_is_refused():
    twice = Prepared(
        lambda pk: Ticket.objects.filter(Q(pk=pk) | Q(created_by_id=pk)).values_list("id"),
        pk=int,
    )
    with pytest.raises(ValueError, match="not one plain SQL parameter"):
        twice.rows(pk=1)
