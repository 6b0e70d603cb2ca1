"""Migrations, forwards and backwards, on a database as the older version left it.

0007/0008 carry the holder from the active assignments onto the tickets: tickets in every
status, with their assignment history (ended assignments, a reassignment). 0009 fills the
ticket counters from the tickets; 0010 builds the search indexes; 0012 gives past
reassignments their former agent and indexes the events by both agents.
"""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from support.rules import STATUSES

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("support", "0006_assignment_holding")]
AFTER = [("support", "0008_holder_rules")]


def migrate(target):
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(target)
    return executor.loader.project_state(target).apps


@pytest.fixture
def old_schema():
    apps = migrate(BEFORE)
    yield apps
    migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())


def _old_world(apps):
    User = apps.get_model("auth", "User")
    Ticket = apps.get_model("support", "Ticket")
    TicketAssignment = apps.get_model("support", "TicketAssignment")
    admin = User.objects.create(username="old-admin", is_staff=True)
    alice = User.objects.create(username="old-alice")
    bob = User.objects.create(username="old-bob")
    now = timezone.now()
    tickets = {}
    for status in ("open", "assigned", "resolved", "closed"):
        tickets[status] = Ticket.objects.create(title=status, status=status, created_by=admin)
    # the history: a ticket worked by alice, returned to the pool; one reassigned to bob
    TicketAssignment.objects.create(
        ticket=tickets["open"], agent=alice, assigned_at=now, is_active=False, holding=False
    )
    TicketAssignment.objects.create(
        ticket=tickets["assigned"], agent=alice, assigned_at=now, is_active=False, holding=False
    )
    TicketAssignment.objects.create(
        ticket=tickets["assigned"], agent=bob, assigned_at=now, holding=True
    )
    for status in ("resolved", "closed"):
        TicketAssignment.objects.create(
            ticket=tickets[status], agent=alice, assigned_at=now, holding=False
        )
    return {name: t.pk for name, t in tickets.items()}, alice.pk, bob.pk, now


def test_the_holder_moves_onto_the_tickets_and_back(old_schema):
    ids, alice, bob, at = _old_world(old_schema)
    apps = migrate(AFTER)
    Ticket = apps.get_model("support", "Ticket")
    holders = {
        row["title"]: (row["status"], row["assigned_to_id"], row["assigned_at"])
        for row in Ticket.objects.values("title", "status", "assigned_to_id", "assigned_at")
    }
    assert holders == {
        "open": ("open", None, None),
        "assigned": ("assigned", bob, at),
        "resolved": ("resolved", alice, at),
        "closed": ("closed", alice, at),
    }
    # every assignment row stays, as the record
    assert apps.get_model("support", "TicketAssignment").objects.count() == 5

    apps = migrate(BEFORE)  # and back: the holding mark from the statuses
    TicketAssignment = apps.get_model("support", "TicketAssignment")
    holding = set(
        TicketAssignment.objects.filter(holding=True).values_list("ticket_id", "agent_id")
    )
    assert holding == {(ids["assigned"], bob)}


def test_an_open_ticket_left_with_an_active_assignment_is_put_right(old_schema):
    ids, *_ = _old_world(old_schema)
    TicketAssignment = old_schema.get_model("support", "TicketAssignment")
    TicketAssignment.objects.filter(ticket_id=ids["open"]).update(is_active=True)
    apps = migrate(AFTER)
    assert (
        not apps.get_model("support", "TicketAssignment")
        .objects.filter(ticket_id=ids["open"], is_active=True)
        .exists()
    )


def test_a_held_status_without_an_agent_stops_the_migration_with_the_ids(old_schema):
    ids, _, _, _ = _old_world(old_schema)
    TicketAssignment = old_schema.get_model("support", "TicketAssignment")
    TicketAssignment.objects.filter(ticket_id=ids["closed"]).delete()
    with pytest.raises(RuntimeError, match=str(ids["closed"])):
        migrate(AFTER)
    # nothing half done: the old schema's data, and the migration runs once it is put right
    Ticket = old_schema.get_model("support", "Ticket")
    Ticket.objects.filter(pk=ids["closed"]).update(status="open")
    migrate(AFTER)


# --- 0009: the ticket counters, 0010: the search indexes (PostgreSQL) -------------------------
def _counter_sums() -> dict[str, int] | None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('support_ticket_count') IS NOT NULL")
        if not cursor.fetchone()[0]:
            return None
        cursor.execute(
            "SELECT sum(open), sum(assigned), sum(resolved), sum(closed) FROM support_ticket_count"
        )
        return dict(zip(STATUSES, map(int, cursor.fetchone()), strict=True))


def _trigram_indexes() -> dict[str, str]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indexname, indexdef FROM pg_indexes"
            " WHERE tablename = 'support_ticket' AND indexdef LIKE '%gin_trgm_ops%'"
        )
        return dict(cursor.fetchall())


def test_the_counters_are_filled_from_the_tickets_and_dropped_going_back():
    if connection.vendor != "postgresql":
        pytest.fail("the counters are PostgreSQL's: run on PostgreSQL")
    apps = migrate([("support", "0008_holder_rules")])
    try:
        assert _counter_sums() is None
        User = apps.get_model("auth", "User")
        Ticket = apps.get_model("support", "Ticket")
        admin = User.objects.create(username="old-admin", is_staff=True)
        alice = User.objects.create(username="old-alice")
        now = timezone.now()
        made = {"open": 3, "assigned": 2, "resolved": 1, "closed": 4}
        for status, n in made.items():
            agent = {} if status == "open" else {"assigned_to": alice, "assigned_at": now}
            Ticket.objects.bulk_create(
                Ticket(title=status, status=status, created_by=admin, **agent) for _ in range(n)
            )
        migrate([("support", "0009_ticket_counts")])
        assert _counter_sums() == made  # the statuses of support.rules, each filled
        # and kept from then on
        Ticket.objects.filter(status="assigned").update(status="closed")
        assert _counter_sums() == {**made, "assigned": 0, "closed": 6}
        migrate([("support", "0008_holder_rules")])
        assert _counter_sums() is None
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_trigger"
                " WHERE tgrelid = 'support_ticket'::regclass AND NOT tgisinternal"
            )
            assert cursor.fetchone()[0] == 0
    finally:
        migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())
    assert _counter_sums() == {**made, "assigned": 0, "closed": 6}


def test_the_search_indexes_are_on_the_expressions_icontains_compares():
    if connection.vendor != "postgresql":
        pytest.fail("the search indexes are PostgreSQL's: run on PostgreSQL")
    expected = {
        "ticket_title_trgm_idx": "(upper((title)::text) gin_trgm_ops)",
        "ticket_description_trgm_idx": "(upper(description) gin_trgm_ops)",
    }
    indexes = _trigram_indexes()
    assert set(indexes) == set(expected)
    for name, expression in expected.items():
        assert indexes[name].endswith(f"USING gin {expression}"), indexes[name]
    try:
        migrate([("support", "0009_ticket_counts")])
        assert _trigram_indexes() == {}
    finally:
        migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())
    assert _trigram_indexes() == indexes


# --- 0012: who sees an event in the feed -------------------------------------------------------


def _event_indexes() -> dict[str, str]:
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, "support_ticketevent")
    return {
        name: info["columns"]
        for name, info in constraints.items()
        if info["index"]
        and not info["primary_key"]
        and set(info["columns"]) & {"agent_id", "previous_agent_id"}
    }


def test_0012_gives_past_reassignments_their_former_agent_and_indexes_both_agents():
    apps = migrate([("support", "0011_pool_notify")])
    try:
        User = apps.get_model("auth", "User")
        Ticket = apps.get_model("support", "Ticket")
        TicketEvent = apps.get_model("support", "TicketEvent")
        admin = User.objects.create(username="old-admin", is_staff=True)
        alice = User.objects.create(username="old-alice")
        bob = User.objects.create(username="old-bob")
        ticket = Ticket.objects.create(title="t", created_by=admin)
        old = {"ticket_id": ticket.pk, "actor": admin, "from_status": "assigned"}
        made = {
            "assigned": TicketEvent.objects.create(
                kind="assigned", agent=alice, changes={"assigned_to": [None, alice.pk]}, **old
            ),
            "reassigned": TicketEvent.objects.create(
                kind="reassigned", agent=bob, changes={"assigned_to": [alice.pk, bob.pk]}, **old
            ),
            "released": TicketEvent.objects.create(
                kind="released", agent=bob, changes={"assigned_to": [bob.pk, None]}, **old
            ),
            "edited": TicketEvent.objects.create(kind="edited", agent=bob, changes={}, **old),
        }
        assert list(_event_indexes().values()) == [["agent_id"]]  # the foreign key's
        apps = migrate([("support", "0012_events_feed")])
        TicketEvent = apps.get_model("support", "TicketEvent")
        previous = dict(TicketEvent.objects.values_list("kind", "previous_agent_id"))
        assert previous == {
            "assigned": None,
            "reassigned": alice.pk,
            "released": None,
            "edited": None,
        }
        assert all(TicketEvent.objects.filter(pk=e.pk).exists() for e in made.values())
        assert _event_indexes() == {
            "event_agent_idx": ["agent_id", "id"],
            "event_previous_agent_idx": ["previous_agent_id", "id"],
        }
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_index WHERE NOT indisvalid"
                    " AND indrelid = 'support_ticketevent'::regclass"
                )
                assert cursor.fetchone()[0] == 0
        migrate([("support", "0011_pool_notify")])  # and back: the foreign key's index again
        assert list(_event_indexes().values()) == [["agent_id"]]
    finally:
        migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())
