"""Tickets entering the pool wake the agents waiting for work (PostgreSQL only).

The counting trigger of migration 0009 already knows each statement's change in the number of
open tickets; when it grows (a creation, a release, a reopening) the trigger now also sends
``NOTIFY support_pool, '<how many> <when>'``. PostgreSQL delivers it when, and only if, the
transaction commits; every worker's listening connection (support.live) hears it and wakes
its longest waiters. Statements that take tickets out of the pool (a fetch) or move none in
send nothing.

PostgreSQL serializes the commits of transactions that sent a notification (a lock held from
the commit's start to its end), so only writes that put tickets in the pool notify.
"""

import importlib

from django.db import migrations

ANCHOR = "    -- The session's own shard:"
# The payload is "<how many> <when>": PostgreSQL delivers one of a transaction's identical
# notifications, and two statements of one transaction (an idle sweep releasing two agents'
# tickets) may each put the same number of tickets in the pool.
NOTIFY = """    IF d_open > 0 THEN
        PERFORM pg_notify('support_pool', d_open::text || ' ' || clock_timestamp()::text);
    END IF;
"""


def counting_function(notify: bool) -> str:
    """0009's CREATE FUNCTION as CREATE OR REPLACE, with or without the notification."""
    sql = importlib.import_module("support.migrations.0009_ticket_counts").SQL
    start = sql.index("CREATE FUNCTION support_ticket_count_change()")
    end = sql.index("$$;", start) + 3
    body = sql[start:end].replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
    if notify:
        if ANCHOR not in body:
            raise RuntimeError("0009's counting function changed: place the NOTIFY again")
        body = body.replace(ANCHOR, NOTIFY + ANCHOR, 1)
    return body


def _on_postgresql(notify: bool):
    def run(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(counting_function(notify), params=None)

    return run


class Migration(migrations.Migration):
    dependencies = [("support", "0010_ticket_search_indexes")]

    operations = [migrations.RunPython(_on_postgresql(True), _on_postgresql(False))]
