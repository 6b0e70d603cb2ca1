"""Capture the SQL the service really sends per request, as pgbench scripts (the "own SQL").

Run by the harness in its own process with ``DATABASE_URL`` set to the benchmark database.
It makes each kind of request once through Django's test client (every statement of the
request, authentication included, runs in this thread and is recorded by Django's query
capture), then turns the recorded statements into pgbench scripts: the capture users' ids
become the client's variables, the token hash becomes the same SQL hash expression the limit
scripts use, and ids produced by one statement and used by a later one are carried with
``\\gset`` (the id of a ticket the agent holds, from the fetch's read of what it holds, with
``\\aset``). Statements are replayed as the service sent them (same text, same round trips);
the pool's per-checkout liveness check (an empty query) is replayed as ``SELECT 1``. The
ids of the tickets the capture agent holds stay as captured where they are a list (the
same number of primary-key probes).

The keyed create (``Idempotency-Key``, support.api.idempotency) is captured with a fresh
key and once more with the same key and body (the replay). In their scripts the key becomes
:data:`KEY_SQL`, a key of its own per client and per ``:key_no`` (the keyed script counts it
up: a fresh key per transaction; the replay's stays 0: the client's one key, which its
first transaction stores), and the key's advisory lock takes the hash of that key.

Prints one JSON object: {"scripts": {scenario: script text}, "statements": {scenario: the
number of statements one request sends, the token check included, the pool's liveness check
not}}.
"""

import json
import os
import re
import sys
from datetime import timedelta

import django

CAPTURE_AGENT = 900_001
CAPTURE_ADMIN = 900_002
TICKETS = range(900_000_001, 900_000_016)  # the 15 the capture agent holds
PICKED = 900_000_016  # the one its churn fetch takes
CAPTURE_KEY = "capture-idempotency-key"
CREATE_BODY = {
    "title": "Printer on floor 1 is jammed",
    "description": "Reported by phone.",
    "priority": "normal",
}
# A key per client and per :key_no, new in each run of pgbench (the harness sets :run): the
# limit scripts (bench/sql/keyed_create.sql) build theirs the same way.
KEY_SQL = (
    "format('bench-%s-%s-%s', CAST(:run AS bigint), CAST(:client_id AS int),"
    " CAST(:key_no AS bigint))"
)


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    django.setup()
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client()
    _seed()

    replays: list[bool] = []  # per request: answered from a stored answer

    def run(
        method: str, path: str, user: int, body: dict | None = None, key: str | None = None
    ) -> tuple[list, dict]:
        headers = {"HTTP_AUTHORIZATION": f"Token {user:040d}"}
        if key is not None:
            headers["HTTP_IDEMPOTENCY_KEY"] = key
        from django.db import connection

        with CaptureQueriesContext(connection) as ctx:
            if method == "GET":
                response = client.get(path, **headers)
            else:
                response = client.post(path, body, content_type="application/json", **headers)
        if response.status_code >= 300:
            sys.exit(f"capture: {method} {path} answered {response.status_code}: {response.text}")
        replays.append(response.headers.get("Idempotent-Replayed") == "true")
        return [q["sql"] for q in ctx.captured_queries], response.json()

    poll, held = run("GET", "/api/agent/tickets/", CAPTURE_AGENT)
    assert len(held) == 15, held
    moved = TICKETS[0]
    resolve, _ = run(
        "POST", "/api/agent/tickets/", CAPTURE_AGENT, {"ticket_id": moved, "status": "resolved"}
    )
    close, _ = run(
        "POST", "/api/agent/tickets/", CAPTURE_AGENT, {"ticket_id": moved, "status": "closed"}
    )
    fetch, after = run("GET", "/api/agent/tickets/", CAPTURE_AGENT)
    assert PICKED in {row["id"] for row in after}, after
    admin_list, _ = run("GET", "/api/tickets/?page_size=20", CAPTURE_ADMIN)
    admin_create, created = run("POST", "/api/tickets/", CAPTURE_ADMIN, CREATE_BODY)
    keyed, keyed_created = run("POST", "/api/tickets/", CAPTURE_ADMIN, CREATE_BODY, CAPTURE_KEY)
    replay, replayed = run("POST", "/api/tickets/", CAPTURE_ADMIN, CREATE_BODY, CAPTURE_KEY)
    if replays[-3:] != [False, False, True] or replayed != keyed_created:
        sys.exit(f"capture: the keyed create was not replayed: {replays} {replayed}")

    agent = {CAPTURE_AGENT: ":agent_id", moved: ":ticket_id", PICKED: ":p_id"}
    scripts = {
        "poll": _script(poll, agent, "agent_id"),
        "churn": "\n".join(
            [
                "\\if :phase = 0",
                _script(fetch, agent, "agent_id", carry=True),
                "\\set phase 1",
                "\\elif :phase = 1",
                _script(resolve, agent, "agent_id"),
                "\\set phase 2",
                "\\else",
                _script(close, agent, "agent_id"),
                "\\set phase 0",
                "\\endif",
            ]
        ),
        "admin-list": _script(admin_list, {CAPTURE_ADMIN: ":admin_id"}, "admin_id"),
        "admin-create": _script(
            admin_create, {CAPTURE_ADMIN: ":admin_id", created["id"]: ":c_id"}, "admin_id"
        ),
    }
    admin = {CAPTURE_ADMIN: ":admin_id", keyed_created["id"]: ":c_id"}
    keyed_script = _script(_keyed(keyed), admin, "admin_id")
    scripts["admin-create-keyed"] = "\\set key_no :key_no + 1\n" + keyed_script
    scripts["admin-create-replay"] = "\n".join(
        [
            "\\if :phase = 0",  # the client's first request stores its key's answer
            keyed_script,
            "\\set phase 1",
            "\\else",
            _script(_keyed(replay), admin, "admin_id"),
            "\\endif",
        ]
    )
    captured = {  # churn mixes three kinds of request: tests/test_hot_paths.py counts each
        "poll": poll,
        "admin-list": admin_list,
        "admin-create": admin_create,
        "admin-create-keyed": keyed,
        "admin-create-replay": replay,
    }
    statements = {name: len(sql) for name, sql in captured.items()}
    print(json.dumps({"scripts": scripts, "statements": statements}))


def _keyed(statements: list[str]) -> list[str]:
    """A keyed request's statements with the captured key made :data:`KEY_SQL`, and the key's
    advisory lock taken on that key's hash."""
    out = []
    for sql in statements:
        if sql.startswith("SELECT pg_try_advisory_xact_lock("):
            # two 32-bit keys, as support.api.idempotency takes it: the user, the key's hash
            sql = f"SELECT pg_try_advisory_xact_lock(CAST(:admin_id AS int), hashtext({KEY_SQL}))"
        elif f"'{CAPTURE_KEY}'" in sql:
            sql = sql.replace(f"'{CAPTURE_KEY}'", KEY_SQL)
        out.append(sql)
    return out


def _seed() -> None:
    """The capture users (an agent holding 15, an admin) and their tickets, idempotently."""
    from django.contrib.auth import get_user_model
    from django.db import transaction
    from django.utils import timezone

    from support import services
    from support.models import ApiToken, IdempotencyKey, Ticket, TicketAssignment
    from support.tokens import key_hash

    User = get_user_model()
    now = timezone.now()
    with transaction.atomic():
        agent, _ = User.objects.get_or_create(id=CAPTURE_AGENT, defaults={"username": "capture"})
        agent.groups.add(services.agents_group())
        User.objects.get_or_create(
            id=CAPTURE_ADMIN, defaults={"username": "capture-admin", "is_staff": True}
        )
        for user in (CAPTURE_AGENT, CAPTURE_ADMIN):
            ApiToken.objects.get_or_create(
                key_hash=key_hash(f"{user:040d}"),
                defaults={"user_id": user, "expires_at": now + timedelta(days=7)},
            )
        TicketAssignment.objects.filter(agent_id=CAPTURE_AGENT).delete()
        IdempotencyKey.objects.filter(user_id=CAPTURE_ADMIN).delete()
        Ticket.objects.filter(id__gte=TICKETS[0]).delete()
        Ticket.objects.bulk_create(
            Ticket(
                id=pk,
                title=f"Capture {pk}",
                status="assigned",
                priority=1,
                created_by_id=CAPTURE_ADMIN,
                created_at=now,
                updated_at=now,
                assigned_to_id=CAPTURE_AGENT,
                assigned_at=now,
            )
            for pk in TICKETS
        )
        TicketAssignment.objects.bulk_create(
            TicketAssignment(ticket_id=pk, agent_id=CAPTURE_AGENT, assigned_at=now)
            for pk in TICKETS
        )
        # First in pick order: the ticket the churn fetch takes.
        Ticket.objects.create(
            id=PICKED,
            title="Capture pick",
            priority=3,
            created_by_id=CAPTURE_ADMIN,
            created_at=now - timedelta(days=36500),
        )


_HASH = re.compile(r"'([0-9a-f]{64})'")


def _script(statements: list[str], names: dict[int, str], user_var: str, carry=False) -> str:
    """pgbench lines for one request's statements."""
    lines = ["SELECT 1;  -- the pool's liveness check on checkout"]
    for sql in statements:
        if "support_apitoken" in sql:  # the token check (a keyed request's row has a hash too)
            sql = _HASH.sub(
                f"encode(sha256(convert_to(lpad(CAST(:{user_var} AS text), 40, '0'), 'UTF8')),"
                " 'hex')",
                sql,
            )
        sql = _outside_quotes(sql, names)
        end = ";"
        if "SKIP LOCKED" in sql:
            end = "\n\\gset p_"  # the picked ticket's id, used by the update and inserts
        elif carry and _held(sql):
            # what the agent holds, oldest first: the last row's id (the newest held ticket)
            # is the one the next resolve and close move
            end = "\n\\aset\n\\set ticket_id :id"
        elif 'INSERT INTO "support_ticket" ' in sql and "RETURNING" in sql:
            end = "\n\\gset c_"  # the created ticket's id, used by its event
        lines.append(" ".join(sql.split()) + end)
    return "\n".join(lines)


def _held(sql: str) -> bool:
    """The read of what the agent holds: its tickets in status assigned, in answer order."""
    return (
        sql.startswith("SELECT ")
        and '"support_ticket"."assigned_to_id" = ' in sql
        and '"support_ticket"."status" = \'assigned\'' in sql
        and "ORDER BY" in sql
        and "FOR " not in sql.rsplit("ORDER BY", 1)[1]
    )


def _outside_quotes(sql: str, names: dict[int, str]) -> str:
    """Replace whole numbers in ``names`` with pgbench variables, outside string literals
    (a number inside a JSON literal stays as captured: the literal is replayed as it was).

    pgbench takes every ``:name`` for a variable, in a literal too (a stored answer's
    ``"assigned_to":null``): there a space goes after the colon (the same JSON, one byte
    longer), or the prepared statement gets more parameters than it uses."""
    parts = sql.split("'")
    for i in range(0, len(parts), 2):  # even parts are outside quotes
        for number, var in names.items():
            parts[i] = re.sub(rf"(?<![\w.]){number}(?![\w.])", f"CAST({var} AS bigint)", parts[i])
    for i in range(1, len(parts), 2):
        parts[i] = re.sub(r":(?=[A-Za-z_])", ": ", parts[i])
    return "'".join(parts)


if __name__ == "__main__":
    main()
