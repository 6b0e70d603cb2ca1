"""The ticket counters (PostgreSQL, migration 0009): exact per status whoever writes the ticket
table (the services, the admin site, raw SQL as the benchmark writes it), one counter row per
session, none at all for a write that moves no ticket between statuses.

The stress, fault, concurrency and model-based tests check them too, through
tests.invariants (count_violations).
"""

import psycopg
import pytest
from django.db import connection

from support import services
from support.rules import STATUSES
from support.services import status_count
from tests.conftest import create_held, create_tickets, create_user
from tests.invariants import count_violations
from tests.servers import psycopg_conninfo

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _postgresql():
    if connection.vendor != "postgresql":
        pytest.fail("the counters are PostgreSQL's: run on PostgreSQL")


def counts() -> dict[str, int]:
    return {status: status_count([status]) for status in STATUSES}


def raw(sql: str, params=None) -> list:
    """Run ``sql`` on a connection of its own (autocommit), as the benchmark's seeding does."""
    with psycopg.connect(psycopg_conninfo(), autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def test_the_counters_have_one_column_per_status_of_the_rules():
    columns = raw(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_name = 'support_ticket_count' ORDER BY ordinal_position"
    )
    assert [name for (name,) in columns] == ["shard", *STATUSES]
    assert raw("SELECT count(*), min(shard), max(shard) FROM support_ticket_count") == [(32, 0, 31)]


def test_the_services_keep_the_counters_exact():
    admin = create_user(staff=True)
    agent = create_user(agent=True)
    ids = [
        services.ticket_create(title=f"t{n}", description="", priority=1, created_by_id=admin.pk)[
            "id"
        ]
        for n in range(20)
    ]
    assert counts() == {"open": 20, "assigned": 0, "resolved": 0, "closed": 0}
    services.tickets_top_up(agent_id=agent.pk)  # 15 of them, in one UPDATE
    held = [row["id"] for row in services.held_tickets(agent.pk)]
    services.ticket_transition_by_agent(agent_id=agent.pk, ticket_id=held[0], to_status="resolved")
    services.ticket_transition_by_agent(agent_id=agent.pk, ticket_id=held[0], to_status="closed")
    services.ticket_transition_by_agent(agent_id=agent.pk, ticket_id=held[1], to_status="resolved")
    services.ticket_update(ticket_id=held[2], changes={"title": "renamed"}, actor_id=admin.pk)
    services.ticket_delete(ticket_id=held[3], actor_id=admin.pk)
    open_one = next(pk for pk in ids if pk not in held)
    services.ticket_update(
        ticket_id=open_one, changes={"status": "closed", "assigned_to": agent.pk}, actor_id=admin.pk
    )
    assert counts() == {"open": 4, "assigned": 12, "resolved": 1, "closed": 2}
    services.agent_deactivate(agent_id=agent.pk, actor_id=admin.pk)  # assigned -> open
    assert counts() == {"open": 16, "assigned": 0, "resolved": 1, "closed": 2}
    assert count_violations() == []
    assert status_count() == 19
    assert status_count(["open", "closed"]) == 18


def test_raw_sql_writes_keep_the_counters_exact():
    """The benchmark seeds and churns with SQL of its own: bulk inserts, data-modifying CTEs,
    deletes of a surplus. The triggers count whatever writes the table."""
    admin = create_user(staff=True)
    agent = create_user(agent=True)
    raw(
        "INSERT INTO support_ticket (title, description, status, priority, created_at,"
        " updated_at, created_by_id)"
        " SELECT format('Seeded ticket %%s', g), '', 'open', g %% 4,"
        " now() - (g || ' seconds')::interval, now(), %s FROM generate_series(1, 300) g",
        (admin.pk,),
    )
    raw(
        "INSERT INTO support_ticket (title, description, status, priority, created_at,"
        " updated_at, created_by_id, assigned_to_id, assigned_at)"
        " SELECT 'Old', '', 'closed', 1, now(), now(), %s, %s, now()"
        " FROM generate_series(1, 200)",
        (admin.pk, agent.pk),
    )
    # the churn's fetch: pick, update and log in one statement
    raw(
        "WITH pick AS (SELECT id FROM support_ticket WHERE status = 'open'"
        "  ORDER BY priority DESC, created_at, id LIMIT 15 FOR NO KEY UPDATE SKIP LOCKED),"
        " taken AS (UPDATE support_ticket t SET status = 'assigned', assigned_to_id = %s,"
        "  assigned_at = now() WHERE t.id IN (SELECT id FROM pick) RETURNING t.id)"
        " INSERT INTO support_ticketassignment (ticket_id, agent_id, assigned_at, is_active)"
        " SELECT id, %s, now(), true FROM taken",
        (agent.pk, agent.pk),
    )
    raw(
        "UPDATE support_ticket SET status = 'resolved' WHERE id IN (SELECT id FROM"
        " support_ticket WHERE status = 'assigned' ORDER BY id LIMIT 5)"
    )
    # the refill's delete of the newest surplus, with its history
    raw(
        "WITH surplus AS (DELETE FROM support_ticket WHERE id IN (SELECT id FROM support_ticket"
        " WHERE status = 'open' ORDER BY id DESC LIMIT 35) RETURNING id)"
        " DELETE FROM support_ticketevent WHERE ticket_id IN (SELECT id FROM surplus)"
    )
    assert counts() == {"open": 250, "assigned": 10, "resolved": 5, "closed": 200}
    assert count_violations() == []


def test_truncating_the_tickets_zeroes_the_counters():
    admin = create_user(staff=True)
    create_tickets(admin, 7)
    assert status_count() == 7
    raw("TRUNCATE support_ticket CASCADE")
    assert counts() == dict.fromkeys(STATUSES, 0)


def _free_shards(conn: psycopg.Connection) -> int:
    """How many counter rows another session could lock right now."""
    with conn.transaction():
        return len(
            conn.execute("SELECT shard FROM support_ticket_count FOR UPDATE SKIP LOCKED").fetchall()
        )


def test_a_transaction_locks_its_sessions_shard_only_when_a_status_count_changes():
    admin = create_user(staff=True)
    agent = create_user(agent=True)
    [ticket] = create_tickets(admin, 1)
    [held] = create_held(admin, agent, 1)
    with (
        psycopg.connect(psycopg_conninfo()) as writer,
        psycopg.connect(psycopg_conninfo(), autocommit=True) as observer,
    ):
        shard = writer.execute("SELECT pg_backend_pid() % 32").fetchone()[0]
        # edits that leave every status count as it was: no counter row locked
        writer.execute("UPDATE support_ticket SET title = 'renamed' WHERE id = %s", (ticket.pk,))
        writer.execute(
            "UPDATE support_ticket SET status = 'open', assigned_to_id = NULL, assigned_at = NULL"
            " WHERE id = %s",
            (ticket.pk,),
        )
        assert _free_shards(observer) == 32
        # a move between statuses: its session's row, and that one only
        writer.execute("UPDATE support_ticket SET status = 'resolved' WHERE id = %s", (held.pk,))
        writer.execute("UPDATE support_ticket SET status = 'closed' WHERE id = %s", (held.pk,))
        writer.execute(
            "INSERT INTO support_ticket (title, description, status, priority,"
            " created_at, updated_at, created_by_id) VALUES ('new', '', 'open', 1,"
            " now(), now(), %s)",
            (admin.pk,),
        )
        assert _free_shards(observer) == 31
        locked = observer.execute(
            "SELECT shard FROM support_ticket_count WHERE shard = %s FOR UPDATE SKIP LOCKED",
            (shard,),
        ).fetchall()
        assert locked == []
        # uncommitted: nobody else counts it yet
        assert observer.execute("SELECT sum(closed) FROM support_ticket_count").fetchone()[0] == 0
        writer.commit()
        assert _free_shards(observer) == 32
    assert counts() == {"open": 2, "assigned": 0, "resolved": 0, "closed": 1}
    assert count_violations() == []


def test_the_invariant_checker_sees_counters_that_drifted():
    admin = create_user(staff=True)
    create_tickets(admin, 3)
    assert count_violations() == []
    raw("UPDATE support_ticket_count SET closed = closed + 1 WHERE shard = 5")
    assert count_violations() == [
        "closed: the counters say 1, the tickets 0",
        "in all: the counters say 4, there are 3",
    ]
