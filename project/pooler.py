"""Serving through PgBouncer in transaction pooling (``DB_POOLER=pgbouncer``; README: Scale-out).

In transaction pooling PgBouncer lends a server session to a client for one transaction, and
the next transaction of the same client may run on another one. So the app keeps nothing in a
session through it:

- **No server-side prepared statements.** With server-side binding psycopg prepares a query
  on the server after ``prepare_threshold`` executions, and an execution lent another server
  session then fails (``prepared statement "_pg3_0" does not exist``: PgBouncer 1.18 does not
  track them). Django's cursors bind parameters on the client (psycopg's ``ClientCursor``,
  which never prepares), and Django sets ``prepare_threshold=None`` unless ``OPTIONS`` says
  otherwise; the settings say None again, so that ``server_side_binding`` could not bring
  prepares back. ``support.prepared`` only caches the compiled SQL in the process: its queries
  are sent like any other.
- **No server-side cursors**: ``QuerySet.iterator()`` would DECLARE a cursor WITH HOLD in one
  transaction and FETCH from it in the next; ``DISABLE_SERVER_SIDE_CURSORS`` makes it fetch
  in chunks without one.
- **No session settings at connection start.** PgBouncer 1.18 refuses the startup parameter
  ``options`` (``-c lock_timeout=...``), and ``ignore_startup_parameters`` would drop it
  silently. The three timeouts (:data:`SESSION_SETTINGS`) are the role's defaults instead,
  ``ALTER ROLE <app role> IN DATABASE <db> SET ...``, which PostgreSQL applies to every
  session PgBouncer opens for that role. :func:`session_settings_problems` reads them through
  the pooler; ``python -m project.serve`` refuses to start and ``manage.py check --deploy``
  fails when they differ from ``DB_LOCK_TIMEOUT_MS`` / ``DB_STATEMENT_TIMEOUT_MS``.
- **Nothing else of a session**: no ``SET`` without ``LOCAL``, no session advisory locks
  (the service takes none: its mutexes are row locks), no temporary tables, no ``LISTEN``.
  The workers' listening connections (``SUPPORT_LISTEN_DATABASE_URL``) and the migrations
  (which need ``statement_timeout=0`` for their index builds) go to PostgreSQL directly.
  Django's ``SET TIME ZONE`` on a new connection (when the server's TimeZone is not UTC) is
  safe: PgBouncer tracks TimeZone and sets it on whichever server session it lends.

Why role defaults rather than ``SET LOCAL`` in every transaction: many of the service's
statements run outside any transaction (the token check, an agent's poll at the cap, the
lists), where ``SET LOCAL`` does nothing; wrapping each in ``BEGIN; SET LOCAL ...; COMMIT``
would add round trips to every request (the hot poll is one statement today), and a path that
forgot would run without a timeout, silently. Role defaults cost nothing per request and
cover every session of the role, an operator's psql included. Their cost: the values live in
two places, the environment and the database, hence the check; and a server session keeps
the values it started with, so after an ``ALTER ROLE`` run ``RECONNECT`` on PgBouncer's
console (or wait ``server_lifetime``). PgBouncer's ``connect_query`` was the third way: it
logs a failing query and goes on, so a typo would leave no timeout, again silently.
"""

from collections.abc import Mapping

import psycopg
from django.conf import settings
from psycopg import sql

# PostgreSQL setting -> the setting of this service that says its value, in milliseconds.
SESSION_SETTINGS = {
    "lock_timeout": "DB_LOCK_TIMEOUT_MS",
    "statement_timeout": "DB_STATEMENT_TIMEOUT_MS",
    "idle_in_transaction_session_timeout": "DB_IDLE_IN_TRANSACTION_TIMEOUT_MS",
}
CHECK_APPLICATION_NAME = "support-tickets-check"  # not counted as one of the app's sessions


def expected_session_settings() -> dict[str, int]:
    return {name: getattr(settings, source) for name, source in SESSION_SETTINGS.items()}


def read_session_settings(database: Mapping) -> dict[str, tuple[int, str]]:
    """name -> (value in ms, where PostgreSQL took it from), as a new session of the app's role
    sees them through ``database`` (Django's settings of a connection)."""
    options = database.get("OPTIONS", {})
    params = {
        "dbname": database["NAME"],
        "user": database.get("USER") or None,
        "password": database.get("PASSWORD") or None,
        "host": database.get("HOST") or None,
        "port": database.get("PORT") or None,
        "connect_timeout": options.get("connect_timeout", 3),
        "application_name": CHECK_APPLICATION_NAME,
    }
    params = {key: value for key, value in params.items() if value is not None}
    with psycopg.connect(**params, autocommit=True, prepare_threshold=None) as conn:
        rows = conn.execute(
            # pg_settings gives all three in milliseconds
            "SELECT name, setting, source FROM pg_settings WHERE name = ANY(%s)",
            [list(SESSION_SETTINGS)],
        ).fetchall()
    return {name: (int(setting), source) for name, setting, source in rows}


def session_settings_problems(database: Mapping | None = None) -> list[str]:
    """What differs between the session settings seen through the pooler and the service's
    settings, one sentence each; ``[]`` when they agree. A failed connection is a problem too:
    nothing is known then."""
    database = settings.DATABASES["default"] if database is None else database
    try:
        found = read_session_settings(database)
    except psycopg.Error as exc:
        return [f"could not read the session settings through the pooler: {exc}".strip()]
    problems = []
    for name, wanted in expected_session_settings().items():
        value, source = found[name]
        if value != wanted:
            problems.append(
                f"{name} is {value} ms through the pooler (source: {source}), "
                f"the service expects {wanted} ({SESSION_SETTINGS[name]})"
            )
    return problems


def fix_sql(database: Mapping | None = None) -> str:
    """The statements that give the app's role the service's settings (run as a superuser or
    the role itself, on PostgreSQL), then RECONNECT on PgBouncer's console."""
    database = settings.DATABASES["default"] if database is None else database
    role = sql.Identifier(database.get("USER") or "<app role>").as_string()
    dbname = sql.Identifier(database["NAME"]).as_string()
    return " ".join(
        f"ALTER ROLE {role} IN DATABASE {dbname} SET {name} = {value};"
        for name, value in expected_session_settings().items()
    )
