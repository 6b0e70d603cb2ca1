"""Personas, small factories and an HTTP client over the real ASGI application."""

import asyncio
import itertools
import time

import httpx
import psycopg
import pytest
from asgiref.sync import SyncToAsync, sync_to_async
from django.db import connection
from django.utils import timezone

from support import services
from support.models import ApiToken, IdempotencyKey, Ticket, TicketAssignment, TicketEvent
from support.tokens import token_issue

_names = itertools.count(1)


@pytest.fixture(scope="session")
def asgi_app():
    from project.asgi import application

    return application


@pytest.fixture
def make_client(asgi_app):
    """``make_client(token=None)`` -> an httpx.AsyncClient speaking to the ASGI app."""
    clients = []

    def make(token: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Token {token}"} if token else {}
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=asgi_app),
            base_url="http://testserver",
            headers=headers,
        )
        clients.append(client)
        return client

    yield make
    # The clients hold no sockets (ASGITransport); nothing to close beyond dropping them.
    clients.clear()


def db_state() -> dict:
    """Every row a refused request could touch, in a comparable form."""
    User = services.User
    return {
        "tickets": list(Ticket.objects.order_by("pk").values()),
        "assignments": list(TicketAssignment.objects.order_by("pk").values()),
        "events": list(TicketEvent.objects.order_by("pk").values()),
        "users": list(User.objects.order_by("pk").values()),
        "memberships": list(User.groups.through.objects.order_by("pk").values()),
        "tokens": list(ApiToken.objects.order_by("pk").values()),
        "idempotency_keys": list(IdempotencyKey.objects.order_by("pk").values()),
    }


async def run_sync(fn, /, *args, **kwargs):
    """Run ``fn`` in the sync worker thread and give its database connection back after.

    Outside a request, asgiref's worker thread would otherwise keep a pooled connection checked
    out for the rest of the session.
    """

    def call():
        try:
            return fn(*args, **kwargs)
        finally:
            connection.close()

    return await sync_to_async(call)()


async def until_a_lock_wait(observer, within: float = 10.0) -> None:
    """Until a session other than ``observer`` (a psycopg connection) waits for a lock: a
    request held at a lock the observer's transaction holds."""
    deadline = time.monotonic() + within
    while not observer.execute(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
    ).fetchone()[0]:
        assert time.monotonic() < deadline, "no session came to wait for the lock"
        await asyncio.sleep(0.02)


# The fields of a ticket as the API shows it (issue contract).
TICKET_KEYS = {
    "id",
    "title",
    "description",
    "status",
    "priority",
    "created_by",
    "assigned_to",
    "assigned_at",
    "created_at",
    "updated_at",
    "version",
}

PASSWORD = "pw-for-tests-1"  # create_user's default

# Debian's Chromium, as the browser tests drive it (Playwright downloads no browser): headless
# on a closed network, so nothing in the background tries to reach Google's hosts.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def create_user(*, staff: bool = False, agent: bool = False, password: str = PASSWORD):
    user = services.User.objects.create_user(
        username=f"user{next(_names)}", password=password, is_staff=staff
    )
    if agent:
        user.groups.add(services.agents_group())
    user.token = token_issue(user_id=user.pk)
    return user


def create_tickets(creator, count: int, **fields) -> list[Ticket]:
    return Ticket.objects.bulk_create(
        Ticket(title=f"ticket {n}", created_by=creator, **fields) for n in range(count)
    )


def create_held(creator, agent, count: int, status: str = "assigned", **fields) -> list[Ticket]:
    """Tickets the agent holds (or worked: resolved, closed), with their assignment records,
    written in bulk as the services would leave them."""
    now = timezone.now()
    tickets = create_tickets(
        creator, count, status=status, assigned_to=agent, assigned_at=now, **fields
    )
    TicketAssignment.objects.bulk_create(
        TicketAssignment(ticket=t, agent=agent, assigned_at=now) for t in tickets
    )
    return tickets


@pytest.fixture
def admin(db):
    return create_user(staff=True)


@pytest.fixture
def agent(db):
    return create_user(agent=True)


@pytest.fixture
def other_agent(db):
    return create_user(agent=True)


@pytest.fixture
def admin_client(admin, make_client):
    return make_client(admin.token)


@pytest.fixture
def agent_client(agent, make_client):
    return make_client(agent.token)


@pytest.fixture(autouse=True)
def _empty_cache(request):
    """Throttle counters live in the database cache, which test flushes leave alone: start each
    database test (and the servers it starts) with none."""
    if request.node.get_closest_marker("django_db") is None:
        yield
        return
    from django.core.cache import cache

    with request.getfixturevalue("django_db_blocker").unblock():
        cache.clear()
    yield


@pytest.fixture(scope="session", autouse=True)
def _close_pool_before_teardown(django_db_setup, django_db_blocker):
    """Return pooled connections before the test database is dropped (else DROP refuses).

    Async ORM calls made by test code (outside a request) run in asgiref's single sync worker
    thread, whose connection stays open until closed from that thread.
    """
    yield
    with django_db_blocker.unblock():
        # Each test has its own event loop; a loop a test left behind (schemathesis runs the
        # app on one of its own) may still hold a worker's listening or event-feed session.
        if connection.vendor == "postgresql" and connection.settings_dict["NAME"].startswith(
            "test_"
        ):  # the test database is in use (a session of server tests alone has none)
            from tests.servers import psycopg_conninfo

            with psycopg.connect(psycopg_conninfo(), autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    " AND application_name IN ('support-listener', 'support-events')"
                )
        SyncToAsync.single_thread_executor.submit(lambda: connection.close()).result()
        connection.close()
        if hasattr(connection, "close_pool"):
            connection.close_pool()
