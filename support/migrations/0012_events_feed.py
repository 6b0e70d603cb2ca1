"""The event feed's columns and indexes: who sees an event, read in id order.

An agent sees an event when it is the ticket's agent just before or just after it. ``agent``
already names one of the two (after the event, or before when the event took the ticket from
its agent); the other differs only for a reassignment, where it sat in ``changes`` alone.
``previous_agent`` now holds it, so that an agent's events are two index range reads:
``(agent_id, id)`` and ``(previous_agent_id, id)`` (partial: reassignments only). The first
replaces the plain index on ``agent_id`` that came with the foreign key.

Cheap on a large history, without stopping the service:

- the column is added nullable and without a default or a constraint: a change of the
  catalog, no rewrite of the table;
- the backfill sets it on reassignments only (one statement, its own transaction: it reads
  the table once and locks only the rows it changes, which nothing else writes; new events
  are inserted meanwhile);
- the indexes are built CONCURRENTLY (writes go on), so the migration is non-atomic; an index
  build that failed halfway leaves an invalid index, which the next run drops and builds
  again; the old index is dropped CONCURRENTLY too.

The older version's workers should be stopped before it runs, as a plain restart does
(``python -m project.serve`` migrates before its workers start): a reassignment they wrote
after the backfill would have no ``previous_agent``, and its former agent would not see it in
the feed. (Running ``backfill`` again mends such rows: it only sets the column where unset.)
"""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models
from django.db.models.fields.json import KT
from django.db.models.functions import Cast

TABLE = "support_ticketevent"
INDEXES = {
    "event_agent_idx": "(agent_id, id)",
    "event_previous_agent_idx": "(previous_agent_id, id) WHERE previous_agent_id IS NOT NULL",
}


def backfill(apps, schema_editor):
    """The agent a reassignment took the ticket from, from ``changes["assigned_to"][0]``.
    Idempotent: only rows still without it."""
    TicketEvent = apps.get_model("support", "TicketEvent")
    TicketEvent.objects.using(schema_editor.connection.alias).filter(
        kind="reassigned", previous_agent__isnull=True
    ).update(previous_agent_id=Cast(KT("changes__assigned_to__0"), models.IntegerField()))


def _concurrently(schema_editor) -> str:
    return "CONCURRENTLY " if schema_editor.connection.vendor == "postgresql" else ""


def _agent_fk_indexes(schema_editor) -> list[str]:
    """The plain index the foreign key on agent_id came with (its name is Django's hash)."""
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, TABLE)
    return [
        name
        for name, info in constraints.items()
        if info["index"] and info["columns"] == ["agent_id"] and not info["unique"]
    ]


def create_indexes(apps, schema_editor):
    concurrently = _concurrently(schema_editor)
    for name, columns in INDEXES.items():
        if schema_editor.connection.vendor == "postgresql":
            with schema_editor.connection.cursor() as cursor:
                cursor.execute(
                    "SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
                    [name],
                )
                invalid = cursor.fetchone()
            if invalid and invalid[0]:
                schema_editor.execute(f"DROP INDEX CONCURRENTLY {name}")
        schema_editor.execute(
            f"CREATE INDEX {concurrently}IF NOT EXISTS {name} ON {TABLE} {columns}"
        )
    for name in _agent_fk_indexes(schema_editor):
        schema_editor.execute(f'DROP INDEX {concurrently}IF EXISTS "{name}"')


def drop_indexes(apps, schema_editor):
    concurrently = _concurrently(schema_editor)
    if not _agent_fk_indexes(schema_editor):
        name = schema_editor._create_index_name(TABLE, ["agent_id"], suffix="")
        schema_editor.execute(f'CREATE INDEX {concurrently}"{name}" ON {TABLE} (agent_id)')
    for name in INDEXES:
        schema_editor.execute(f"DROP INDEX {concurrently}IF EXISTS {name}")


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY runs outside a transaction

    dependencies = [
        ("support", "0011_pool_notify"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name="ticketevent",
            name="previous_agent",
            field=models.ForeignKey(
                blank=True,
                db_constraint=False,
                db_index=False,
                null=True,
                on_delete=django.db.models.deletion.DO_NOTHING,
                related_name="+",
                to=settings.AUTH_USER_MODEL,
            ),
        ),
        migrations.RunPython(backfill, migrations.RunPython.noop),
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="ticketevent",
                    name="agent",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="ticket_events",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
                migrations.AddIndex(
                    model_name="ticketevent",
                    index=models.Index(fields=["agent", "id"], name="event_agent_idx"),
                ),
                migrations.AddIndex(
                    model_name="ticketevent",
                    index=models.Index(
                        condition=models.Q(previous_agent__isnull=False),
                        fields=["previous_agent", "id"],
                        name="event_previous_agent_idx",
                    ),
                ),
            ],
            database_operations=[migrations.RunPython(create_indexes, drop_indexes)],
        ),
    ]
