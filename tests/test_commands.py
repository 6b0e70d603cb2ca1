"""Management commands: createagent, createsuperuser --noinput and seed_demo."""

import os
import subprocess
import sys
from io import StringIO

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from support import services
from support.models import ApiToken as Token
from support.models import Ticket, TicketAssignment, TicketEvent
from support.tokens import key_hash
from tests.conftest import create_user, db_state, run_sync
from tests.servers import ROOT, database_url

User = services.User
GOOD_PASSWORD = "A-long-enough-Passw0rd"
transactional = pytest.mark.django_db(transaction=True)


def agent_names() -> set[str]:
    return set(User.objects.filter(groups__name="agents").values_list("username", flat=True))


def user_rows() -> list[dict]:
    return list(User.objects.order_by("pk").values())


def membership_rows() -> list[dict]:
    return list(User.groups.through.objects.order_by("pk").values())


# --- createagent ------------------------------------------------------------------------------
@pytest.mark.smoke
@pytest.mark.django_db
def test_createagent_makes_an_active_agent_with_the_password():
    out = StringIO()
    call_command("createagent", "ann", password=GOOD_PASSWORD, email="ann@example.com", stdout=out)
    user = User.objects.get(username="ann")
    assert user.is_active
    assert not user.is_staff
    assert not user.is_superuser
    assert user.email == "ann@example.com"
    assert user.check_password(GOOD_PASSWORD)
    assert list(user.groups.values_list("name", flat=True)) == ["agents"]
    assert f"Agent ann created (id {user.pk})." in out.getvalue()
    assert GOOD_PASSWORD not in out.getvalue()


@pytest.mark.smoke
@transactional
async def test_agent_made_by_createagent_logs_in_and_fetches_tickets(make_client):
    admin = await run_sync(create_user, staff=True)
    await run_sync(Ticket.objects.create, title="for ann", created_by=admin)
    await run_sync(call_command, "createagent", "ann", password=GOOD_PASSWORD, stdout=StringIO())

    client = make_client()
    login = await client.post(
        "/api/auth/token/", json={"username": "ann", "password": GOOD_PASSWORD}
    )
    assert login.status_code == 200, login.text
    agent = make_client(login.json()["token"])
    fetched = await agent.get("/api/agent/tickets/")
    assert fetched.status_code == 200, fetched.text
    assert [row["title"] for row in fetched.json()] == ["for ann"]
    assert (await agent.get("/api/tickets/")).status_code == 403


@pytest.mark.django_db
def test_createagent_reads_the_password_from_the_named_environment_variable(monkeypatch):
    monkeypatch.setenv("ANN_PASSWORD", GOOD_PASSWORD)
    call_command("createagent", "ann", password_env="ANN_PASSWORD", stdout=StringIO())
    user = User.objects.get(username="ann")
    assert user.check_password(GOOD_PASSWORD)
    assert not user.check_password("ANN_PASSWORD")
    assert agent_names() == {"ann"}


@pytest.mark.django_db
def test_createagent_with_the_password_env_flag_on_the_command_line(monkeypatch):
    monkeypatch.setenv("BO_PASSWORD", GOOD_PASSWORD)
    call_command("createagent", "bo", "--password-env", "BO_PASSWORD", stdout=StringIO())
    assert User.objects.get(username="bo").check_password(GOOD_PASSWORD)


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
@pytest.mark.django_db
def test_createagent_refuses_a_missing_or_empty_password_variable(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("ANN_PASSWORD", raising=False)
    else:
        monkeypatch.setenv("ANN_PASSWORD", value)
    with pytest.raises(CommandError, match="ANN_PASSWORD"):
        call_command("createagent", "ann", password_env="ANN_PASSWORD", stdout=StringIO())
    assert not User.objects.filter(username="ann").exists()


@pytest.mark.django_db
def test_createagent_needs_exactly_one_password_source(monkeypatch):
    monkeypatch.setenv("ANN_PASSWORD", GOOD_PASSWORD)
    with pytest.raises(CommandError):
        call_command("createagent", "ann", stdout=StringIO())
    with pytest.raises(CommandError):
        call_command(
            "createagent",
            "ann",
            "--password",
            GOOD_PASSWORD,
            "--password-env",
            "ANN_PASSWORD",
            stdout=StringIO(),
        )
    assert not User.objects.filter(username="ann").exists()


@pytest.mark.parametrize(
    "password",
    [
        pytest.param("short1!", id="too-short"),
        pytest.param("password", id="common"),
        pytest.param("4839201746", id="all-digits"),
        pytest.param("annabelle-lee", id="like-the-username"),
    ],
)
@pytest.mark.django_db
def test_createagent_refuses_a_weak_password_and_creates_nothing(password):
    before = (user_rows(), membership_rows())
    with pytest.raises(CommandError, match="Password refused"):
        call_command("createagent", "annabelle-lee", password=password, stdout=StringIO())
    assert (user_rows(), membership_rows()) == before
    assert not Group.objects.filter(user__username="annabelle-lee").exists()


@pytest.mark.django_db
def test_createagent_refuses_a_taken_username_and_changes_nothing():
    admin = create_user(staff=True, password="the-admins-own-pw-1")
    create_user(agent=True)
    before = (user_rows(), membership_rows())
    with pytest.raises(CommandError, match="already exists"):
        call_command("createagent", admin.username, password=GOOD_PASSWORD, stdout=StringIO())
    assert (user_rows(), membership_rows()) == before
    admin.refresh_from_db()
    assert admin.check_password("the-admins-own-pw-1")
    assert admin.username not in agent_names()  # the admin did not become an agent


@pytest.mark.django_db
def test_createagent_refuses_a_username_taken_in_another_case():
    call_command("createagent", "Ann", password=GOOD_PASSWORD, stdout=StringIO())
    before = (user_rows(), membership_rows())
    for name in ("ann", "ANN"):
        with pytest.raises(CommandError, match="already exists"):
            call_command("createagent", name, password=GOOD_PASSWORD, stdout=StringIO())
    assert (user_rows(), membership_rows()) == before


# --- createsuperuser --------------------------------------------------------------------------
@transactional
async def test_createsuperuser_noinput_makes_an_admin_who_can_list_tickets(
    make_client, monkeypatch
):
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", GOOD_PASSWORD)
    await run_sync(
        call_command,
        "createsuperuser",
        "--noinput",
        "--username",
        "boss",
        "--email",
        "boss@example.com",
        stdout=StringIO(),
    )
    boss = await run_sync(User.objects.get, username="boss")
    assert boss.is_staff
    assert boss.is_superuser
    assert boss.is_active

    login = await make_client().post(
        "/api/auth/token/", json={"username": "boss", "password": GOOD_PASSWORD}
    )
    assert login.status_code == 200, login.text
    client = make_client(login.json()["token"])
    listed = await client.get("/api/tickets/")
    assert listed.status_code == 200, listed.text
    assert listed.json() == {
        "count": 0,
        "count_exact": True,
        "next": None,
        "previous": None,
        "results": [],
    }
    assert (await client.get("/api/agent/tickets/")).status_code == 403  # not an agent


# --- seed_demo --------------------------------------------------------------------------------
def run_seed_demo() -> list[tuple[str, str, str, str]]:
    """Run seed_demo as scripts/dev.sh does (debug on); return the (role, username, password,
    token) rows it printed."""
    out = StringIO()
    with override_settings(DEBUG=True):
        call_command("seed_demo", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0] == f"Demo data: {Ticket.objects.count()} tickets."
    rows = [tuple(line.split()) for line in lines[2:]]
    assert all(len(row) == 4 for row in rows), lines
    return rows


def demo_counts() -> dict:
    return {
        "users": User.objects.count(),
        "admins": User.objects.filter(is_staff=True, is_active=True).count(),
        "agents": User.objects.filter(groups__name="agents", is_active=True).count(),
        "tickets": Ticket.objects.count(),
        "open": Ticket.objects.filter(status="open").count(),
        "tokens": Token.objects.count(),
    }


@pytest.mark.smoke
@pytest.mark.django_db
def test_seed_demo_creates_an_admin_three_agents_and_40_tickets():
    rows = run_seed_demo()
    assert [(role, name) for role, name, _, _ in rows] == [
        ("admin", "admin"),
        ("agent", "alice"),
        ("agent", "bob"),
        ("agent", "carol"),
    ]
    assert demo_counts() == {
        "users": 4,
        "admins": 1,
        "agents": 3,
        "tickets": 40,
        "open": 40,
        "tokens": 4,
    }
    assert agent_names() == {"alice", "bob", "carol"}
    assert not User.objects.get(username="admin").groups.exists()
    assert Ticket.objects.values("priority").distinct().count() > 1  # mixed priorities
    for _, name, password, token in rows:
        user = User.objects.get(username=name)
        assert user.check_password(password)
        assert Token.objects.get(user=user).key_hash == key_hash(token)  # stored hashed only


@pytest.mark.django_db
def test_seed_demo_run_twice_keeps_the_counts_and_replaces_the_tokens():
    first = run_seed_demo()
    counts = demo_counts()
    second = run_seed_demo()
    assert demo_counts() == counts
    # hashed tokens cannot be printed again: each run replaces them
    assert {row[3] for row in second}.isdisjoint(row[3] for row in first)
    stored = set(Token.objects.values_list("key_hash", flat=True))
    assert stored == {key_hash(row[3]) for row in second}
    for (_, name, old_password, _), (_, _, new_password, _) in zip(first, second, strict=True):
        user = User.objects.get(username=name)
        assert user.check_password(new_password)  # the printed password is the current one
        assert new_password != old_password


@transactional
async def test_seed_demo_prints_tokens_and_passwords_that_authenticate(make_client):
    rows = await run_sync(run_seed_demo)
    tokens = {name: token for _, name, _, token in rows}

    listed = await make_client(tokens["admin"]).get("/api/tickets/", params={"page_size": 100})
    assert listed.status_code == 200, listed.text
    assert listed.json()["count"] == 40

    held = {}
    for name in ("alice", "bob", "carol"):
        fetched = await make_client(tokens[name]).get("/api/agent/tickets/")
        assert fetched.status_code == 200, fetched.text
        held[name] = {row["id"] for row in fetched.json()}
    assert [len(held[name]) for name in ("alice", "bob", "carol")] == [15, 15, 10]
    assert held["alice"].isdisjoint(held["bob"])
    assert held["alice"].isdisjoint(held["carol"])
    assert held["bob"].isdisjoint(held["carol"])
    assert (await make_client(tokens["alice"]).get("/api/tickets/")).status_code == 403

    for _, name, password, token in rows:
        login = await make_client().post(
            "/api/auth/token/", json={"username": name, "password": password}
        )
        assert login.status_code == 200, (name, login.text)
        assert login.json()["token"] != token  # every login issues a new token


@pytest.mark.smoke
@pytest.mark.django_db
def test_seed_demo_writes_each_tickets_created_event():
    run_seed_demo()
    admin = User.objects.get(username="admin")
    tickets = {ticket.pk: ticket for ticket in Ticket.objects.all()}
    events = list(TicketEvent.objects.order_by("ticket_id", "pk"))
    assert [(event.ticket_id, event.kind) for event in events] == [
        (pk, "created") for pk in sorted(tickets)
    ]
    for event in events:
        ticket = tickets[event.ticket_id]
        assert event.actor_id == admin.pk
        assert (event.from_status, event.to_status, event.agent_id) == ("", "open", None)
        assert event.at == ticket.created_at
        assert event.changes == {
            "title": [None, ticket.title],
            "description": [None, ticket.description],
            "priority": [None, ticket.get_priority_display()],
        }
    # Any assignment the demo makes comes with its event (it makes none: all in the pool).
    for assignment in TicketAssignment.objects.all():
        assert TicketEvent.objects.filter(
            ticket_id=assignment.ticket_id, kind="assigned", agent_id=assignment.agent_id
        ).exists()
    assert set(Ticket.objects.values_list("status", flat=True)) == {"open"}

    run_seed_demo()  # a second run adds no ticket, so no event
    assert TicketEvent.objects.count() == len(events)


@pytest.mark.django_db
def test_seed_demo_with_debug_off_is_refused_and_changes_nothing():
    alice = create_user(agent=True, password="alices-real-password-1")
    alice.username = "alice"
    alice.save()
    before = db_state()
    with override_settings(DEBUG=False), pytest.raises(CommandError, match="--force"):
        call_command("seed_demo", stdout=StringIO())
    assert db_state() == before
    alice.refresh_from_db()
    assert alice.check_password("alices-real-password-1")


@pytest.mark.django_db
def test_seed_demo_with_debug_off_runs_when_forced():
    with override_settings(DEBUG=False):
        call_command("seed_demo", "--force", stdout=StringIO())
    assert demo_counts()["tickets"] == 40
    assert agent_names() == {"alice", "bob", "carol"}


@transactional
def test_seed_demo_command_line_with_debug_off_exits_with_an_error():
    before = db_state()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": "seed-demo-under-test-" + "k" * 40,
        "DATABASE_URL": database_url(),
    }
    done = subprocess.run(
        [sys.executable, "manage.py", "seed_demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "DJANGO_DEBUG" in done.stderr
    assert "--force" in done.stderr
    assert done.stdout == ""
    assert db_state() == before
