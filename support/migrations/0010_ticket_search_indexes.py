"""Trigram indexes for the admin list's search (PostgreSQL only; SQLite scans).

``?search=`` is ``icontains`` on title or description, which Django writes on PostgreSQL as
``UPPER("support_ticket"."title"::text) LIKE UPPER(%s)``: the indexes are on exactly these
expressions, with pg_trgm's GIN operator class, so that a LIKE '%term%' reads the tickets that
hold the term's trigrams instead of every ticket.

pg_trgm is a trusted extension (PostgreSQL 13+): the database's owner may create it, no
superuser needed. The indexes are built CONCURRENTLY, so a large ticket table stays writable
meanwhile; hence a non-atomic migration. A build that failed halfway leaves an invalid index,
which the next run drops and builds again. Going back drops the indexes and keeps the
extension, which other objects of the database may use.
"""

from django.db import migrations

INDEXES = {
    "ticket_title_trgm_idx": 'UPPER("title"::text)',
    "ticket_description_trgm_idx": 'UPPER("description"::text)',
}


def create(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    for name, expression in INDEXES.items():
        with schema_editor.connection.cursor() as cursor:
            cursor.execute(
                "SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", [name]
            )
            invalid = cursor.fetchone()
        if invalid and invalid[0]:
            schema_editor.execute(f"DROP INDEX CONCURRENTLY {name}")
        schema_editor.execute(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON support_ticket"
            f" USING gin ({expression} gin_trgm_ops)"
        )


def drop(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for name in INDEXES:
        schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY runs outside a transaction

    dependencies = [("support", "0009_ticket_counts")]

    operations = [migrations.RunPython(create, drop)]
