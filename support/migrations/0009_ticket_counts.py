"""Exact ticket counts per status without a point of contention (PostgreSQL only).

``support_ticket_count`` holds 32 shards, one bigint column per status of support.rules. Three
statement-level triggers on the ticket table read each statement's transition tables and add
its per-status deltas to the shard of the session that ran it (``pg_backend_pid() % 32``); a
statement that moves no ticket between statuses (a title edit) touches no shard. The admin
list counts by summing the shards (support.services.selectors). A fourth trigger zeroes them
when the ticket table is truncated.

The ticket table is locked in SHARE mode (reads go on, writes wait) while the triggers are
created and the counts filled, so that no write slips in between. SQLite keeps COUNT(*).

The statuses are written out here, as a migration must be: tests/test_ticket_counts.py checks
that they are the statuses of support.rules, so a new status needs a migration of its own.
"""

from django.db import migrations

SQL = """
LOCK TABLE support_ticket IN SHARE MODE;

CREATE TABLE support_ticket_count (
    shard smallint PRIMARY KEY CHECK (shard >= 0 AND shard < 32),
    open bigint NOT NULL DEFAULT 0,
    assigned bigint NOT NULL DEFAULT 0,
    resolved bigint NOT NULL DEFAULT 0,
    closed bigint NOT NULL DEFAULT 0
);

CREATE FUNCTION support_ticket_count_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    d_open bigint := 0;
    d_assigned bigint := 0;
    d_resolved bigint := 0;
    d_closed bigint := 0;
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT count(*) FILTER (WHERE status = 'open'),
               count(*) FILTER (WHERE status = 'assigned'),
               count(*) FILTER (WHERE status = 'resolved'),
               count(*) FILTER (WHERE status = 'closed')
          INTO d_open, d_assigned, d_resolved, d_closed
          FROM new_rows;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        SELECT d_open - count(*) FILTER (WHERE status = 'open'),
               d_assigned - count(*) FILTER (WHERE status = 'assigned'),
               d_resolved - count(*) FILTER (WHERE status = 'resolved'),
               d_closed - count(*) FILTER (WHERE status = 'closed')
          INTO d_open, d_assigned, d_resolved, d_closed
          FROM old_rows;
    END IF;
    -- Nothing moved between statuses (an edit of the title, say): no shard is locked.
    IF d_open = 0 AND d_assigned = 0 AND d_resolved = 0 AND d_closed = 0 THEN
        RETURN NULL;
    END IF;
    -- The session's own shard: a transaction locks at most this one row, taken by its ticket
    -- write itself (support/services/locks.py). Inserted if missing, so no delta is lost.
    INSERT INTO support_ticket_count AS c (shard, open, assigned, resolved, closed)
    VALUES (pg_backend_pid() % 32, d_open, d_assigned, d_resolved, d_closed)
    ON CONFLICT (shard) DO UPDATE
       SET open = c.open + EXCLUDED.open,
           assigned = c.assigned + EXCLUDED.assigned,
           resolved = c.resolved + EXCLUDED.resolved,
           closed = c.closed + EXCLUDED.closed;
    RETURN NULL;
END
$$;

CREATE FUNCTION support_ticket_count_reset() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE support_ticket_count SET open = 0, assigned = 0, resolved = 0, closed = 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER ticket_count_insert AFTER INSERT ON support_ticket
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION support_ticket_count_change();
CREATE TRIGGER ticket_count_update AFTER UPDATE ON support_ticket
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION support_ticket_count_change();
CREATE TRIGGER ticket_count_delete AFTER DELETE ON support_ticket
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION support_ticket_count_change();
CREATE TRIGGER ticket_count_truncate AFTER TRUNCATE ON support_ticket
    FOR EACH STATEMENT EXECUTE FUNCTION support_ticket_count_reset();

-- Every shard exists from the start; today's counts go to shard 0.
INSERT INTO support_ticket_count (shard) SELECT g FROM generate_series(0, 31) g;
UPDATE support_ticket_count
   SET (open, assigned, resolved, closed) = (
       SELECT count(*) FILTER (WHERE status = 'open'),
              count(*) FILTER (WHERE status = 'assigned'),
              count(*) FILTER (WHERE status = 'resolved'),
              count(*) FILTER (WHERE status = 'closed')
         FROM support_ticket)
 WHERE shard = 0;
"""

DROP = """
DROP TRIGGER ticket_count_truncate ON support_ticket;
DROP TRIGGER ticket_count_delete ON support_ticket;
DROP TRIGGER ticket_count_update ON support_ticket;
DROP TRIGGER ticket_count_insert ON support_ticket;
DROP FUNCTION support_ticket_count_reset();
DROP FUNCTION support_ticket_count_change();
DROP TABLE support_ticket_count;
"""


def _on_postgresql(sql: str):
    def run(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(sql, params=None)  # no placeholders: % is modulo

    return run


class Migration(migrations.Migration):
    dependencies = [("support", "0008_holder_rules")]

    operations = [migrations.RunPython(_on_postgresql(SQL), _on_postgresql(DROP))]
