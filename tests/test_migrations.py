"""Migrations 0007/0008 carry the holder from the active assignments onto the tickets.

Run on a database as the older version left it: tickets in every status, with their
assignment history (ended assignments, a reassignment), checked forwards and backwards.
"""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

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
