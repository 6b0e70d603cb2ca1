"""The Django admin site: every change made there goes through the services, so the cap and the
rules hold, a refusal is a form error that changes nothing, and every change leaves its event.

Server-side tests drive the admin with Django's test client; the last test drives it in headless
Chromium (Playwright) against uvicorn in a subprocess, keeping a screenshot of every page in
``test-artifacts/admin-site/``.
"""

import os
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from support import services
from support.models import ApiToken as Token
from support.models import Ticket, TicketAssignment, TicketEvent
from tests.conftest import CHROMIUM, CHROMIUM_ARGS, create_user
from tests.invariants import assert_invariants
from tests.servers import database_url, free_port

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts" / "admin-site"
TICKETS = "/admin/support/ticket/"
USERS = "/admin/auth/user/"


# --- Helpers ---------------------------------------------------------------------------------
class _FormFields(HTMLParser):
    """The name/value pairs a browser would submit from the form with the given id."""

    def __init__(self, form_id: str):
        super().__init__(convert_charrefs=True)
        self.form_id = form_id
        self.inside = False
        self.fields: list[tuple[str, str]] = []
        self._select: str | None = None
        self._textarea: tuple[str, list[str]] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form":
            self.inside = attrs.get("id") == self.form_id
        elif not self.inside:
            return
        elif tag == "input":
            kind = (attrs.get("type") or "text").lower()
            name = attrs.get("name")
            if not name or kind in ("submit", "button", "image", "reset", "file"):
                return
            if kind in ("checkbox", "radio"):
                if "checked" in attrs:
                    self.fields.append((name, attrs.get("value") or "on"))
                return
            self.fields.append((name, attrs.get("value") or ""))
        elif tag == "select":
            self._select = attrs.get("name")
        elif tag == "option" and self._select and "selected" in attrs:
            self.fields.append((self._select, attrs.get("value") or ""))
        elif tag == "textarea":
            self._textarea = (attrs["name"], [])

    def handle_endtag(self, tag):
        if tag == "form":
            self.inside = False
        elif tag == "select":
            self._select = None
        elif tag == "textarea" and self._textarea:
            name, chunks = self._textarea
            value = "".join(chunks)
            self.fields.append((name, value.removeprefix("\r\n").removeprefix("\n")))
            self._textarea = None

    def handle_data(self, data):
        if self._textarea:
            self._textarea[1].append(data)


def form_data(client, url: str, form_id: str) -> dict[str, list[str]]:
    """GET ``url`` and return what submitting its form unchanged would send."""
    response = client.get(url)
    assert response.status_code == 200, response.status_code
    parser = _FormFields(form_id)
    parser.feed(response.content.decode())
    assert parser.fields, f"no form #{form_id} at {url}"
    data: dict[str, list[str]] = {}
    for name, value in parser.fields:
        data.setdefault(name, []).append(value)
    return data


def change_url(pk: int) -> str:
    return f"{TICKETS}{pk}/change/"


def new_ticket(creator, title: str = "ticket", **fields) -> int:
    row = services.ticket_create(
        title=title,
        description=fields.get("description", ""),
        priority=fields.get("priority", Ticket.Priority.NORMAL),
        created_by_id=creator.pk,
    )
    return row["id"]


def assign(ticket_id: int, agent, actor) -> None:
    services.ticket_update(
        ticket_id=ticket_id, changes={"assigned_to": agent.pk}, actor_id=actor.pk
    )


def holder(ticket_id: int) -> int | None:
    return (
        TicketAssignment.objects.filter(ticket_id=ticket_id, is_active=True)
        .values_list("agent_id", flat=True)
        .first()
    )


def events(ticket_id: int) -> list[tuple[str, int, int | None]]:
    return list(
        TicketEvent.objects.filter(ticket_id=ticket_id)
        .order_by("id")
        .values_list("kind", "actor_id", "agent_id")
    )


def listed(response) -> list[int]:
    return [ticket.pk for ticket in response.context["cl"].result_list]


def form_errors(response) -> list[str]:
    form = response.context["adminform"].form
    return [str(message) for messages in form.errors.values() for message in messages]


def make_superuser(password: str = "pw-for-tests-1"):
    user = create_user(staff=True, password=password)
    user.is_superuser = True
    user.save(update_fields=["is_superuser"])
    return user


@pytest.fixture
def boss(db):
    return make_superuser()


@pytest.fixture
def site(client, boss):
    client.force_login(boss)
    return client


# --- Tickets: list, filters, search --------------------------------------------------------
@pytest.mark.django_db
def test_ticket_list_shows_status_priority_and_holder_and_filters_by_them(
    site, boss, agent, other_agent
):
    printer = new_ticket(boss, "Printer jams", description="paper", priority=0)
    vpn = new_ticket(boss, "VPN drops", description="every hour, also the printer", priority=3)
    mail = new_ticket(boss, "Mail bounces", priority=2)
    assign(vpn, agent, boss)
    assign(mail, other_agent, boss)
    services.ticket_update(ticket_id=mail, changes={"status": "resolved"}, actor_id=boss.pk)

    response = site.get(TICKETS)
    assert response.status_code == 200
    assert sorted(listed(response)) == sorted([printer, vpn, mail])
    page = response.content.decode()
    for text in ("urgent", "low", "assigned", "resolved", agent.username, other_agent.username):
        assert text in page
    assert f"?agent={agent.pk}" in page  # the agent filter offers each agent

    def only(query: str) -> list[int]:
        response = site.get(TICKETS + query)
        assert response.status_code == 200
        return sorted(listed(response))

    assert only("?status__exact=assigned") == [vpn]
    assert only("?status__exact=open") == [printer]
    assert only("?priority__exact=3") == [vpn]
    assert only(f"?agent={agent.pk}") == [vpn]
    assert only(f"?agent={other_agent.pk}") == [mail]  # the record of who worked it
    assert only("?agent=none") == [printer]
    assert only("?agent=nobody") == []
    assert only("?q=printer") == sorted([printer, vpn])  # title or description
    assert only("?q=bounces") == [mail]


@pytest.mark.django_db
def test_ticket_list_query_count_does_not_grow_with_the_page(site, boss, agent):
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert site.get(TICKETS).status_code == 200
        return len(captured)

    assign(new_ticket(boss), agent, boss)
    few = queries()
    for n in range(10):
        ticket = new_ticket(boss, f"more {n}")
        if n % 2:
            assign(ticket, agent, boss)
    assert queries() == few


# --- Tickets: add and change forms -----------------------------------------------------------
@pytest.mark.django_db
def test_add_form_creates_the_ticket_through_the_service_with_its_created_event(site, boss):
    response = site.get(TICKETS + "add/")
    assert response.status_code == 200
    fields = set(response.context["adminform"].form.fields)
    assert fields == {"title", "description", "priority"}  # a new ticket starts in the pool

    response = site.post(
        TICKETS + "add/",
        {"title": "  Monitor flickers  ", "description": "since Monday", "priority": "2"},
    )
    assert response.status_code == 302
    ticket = Ticket.objects.get()
    assert (ticket.title, ticket.description, ticket.priority, ticket.status) == (
        "Monitor flickers",
        "since Monday",
        2,
        "open",
    )
    assert ticket.created_by_id == boss.pk
    assert response["Location"] == TICKETS
    event = TicketEvent.objects.get(ticket_id=ticket.pk)
    assert (event.kind, event.actor_id, event.to_status) == ("created", boss.pk, "open")
    assert event.changes["priority"] == [None, "high"]
    assert LogEntry.objects.filter(object_id=str(ticket.pk), action_flag=ADDITION).exists()
    assert_invariants()


@pytest.mark.django_db
def test_add_form_refuses_a_blank_title_and_creates_nothing(site):
    response = site.post(TICKETS + "add/", {"title": "   ", "description": "", "priority": "1"})
    assert response.status_code == 200
    assert "This field is required." in form_errors(response)
    assert not Ticket.objects.exists()
    assert not TicketEvent.objects.exists()


@pytest.mark.django_db
def test_change_form_assigns_an_agent_through_the_service(site, boss, agent):
    pk = new_ticket(boss, "Laptop will not boot")
    data = form_data(site, change_url(pk), "ticket_form")
    assert data["assigned_to"] == [""]
    data["assigned_to"] = [str(agent.pk)]

    response = site.post(change_url(pk), data)
    assert response.status_code == 302, form_errors(response)
    assert holder(pk) == agent.pk
    assert Ticket.objects.get(pk=pk).status == "assigned"
    assert events(pk)[-1] == ("assigned", boss.pk, agent.pk)
    entry = LogEntry.objects.get(object_id=str(pk), action_flag=CHANGE)
    assert entry.get_change_message() == "Changed Assigned to."
    assert_invariants()

    # The change page shows the assignment and the history, read-only.
    page = site.get(change_url(pk)).content.decode()
    assert "assigned" in page
    assert agent.username in page
    assert "assignments-0-DELETE" not in page
    assert "events-0-DELETE" not in page


@pytest.mark.django_db
@override_settings(SUPPORT_AGENT_MAX_TICKETS=2)
def test_assigning_past_the_cap_is_a_form_error_and_changes_nothing(site, boss, agent):
    for n in range(2):
        assign(new_ticket(boss, f"held {n}"), agent, boss)
    pk = new_ticket(boss, "one too many")
    data = form_data(site, change_url(pk), "ticket_form")
    data["assigned_to"] = [str(agent.pk)]
    before = TicketEvent.objects.count()

    response = site.post(change_url(pk), data)
    assert response.status_code == 200
    errors = response.context["adminform"].form.non_field_errors()
    # the agent by username, as the form's choices name it
    assert errors == [
        f"Agent {agent.username} (id {agent.pk}) already holds 2 assigned tickets (the cap)."
    ]
    assert errors[0] in response.content.decode()
    assert f"{agent.username} (2/2 assigned)" in response.content.decode()
    assert Ticket.objects.get(pk=pk).status == "open"
    assert holder(pk) is None
    assert TicketEvent.objects.count() == before
    assert not LogEntry.objects.filter(action_flag=CHANGE).exists()
    assert len(services.held_tickets(agent.pk)) == 2
    assert_invariants()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"status": ["resolved"]}, "A ticket in status 'resolved' needs an agent"),
        ({"status": ["closed"]}, "A ticket in status 'closed' needs an agent"),
        ({"status": ["assigned"]}, "A ticket in status 'assigned' needs an agent"),
        ({"assigned_to": "inactive"}, "Select a valid choice."),
        ({"title": ["   "]}, "This field is required."),
    ],
)
def test_a_refused_edit_shows_why_and_changes_nothing(site, boss, edit, message):
    pk = new_ticket(boss, "Keyboard")
    gone = create_user(agent=True)
    services.agent_deactivate(agent_id=gone.pk, actor_id=boss.pk)
    data = form_data(site, change_url(pk), "ticket_form")
    if "assigned_to" in edit:
        edit["assigned_to"] = [str(gone.pk)]
    data.update(edit)

    response = site.post(change_url(pk), data)
    assert response.status_code == 200
    assert any(error.startswith(message) for error in form_errors(response)), form_errors(response)
    ticket = Ticket.objects.get(pk=pk)
    assert (ticket.title, ticket.status) == ("Keyboard", "open")
    assert holder(pk) is None
    assert [kind for kind, _, _ in events(pk)] == ["created"]


@pytest.mark.django_db
def test_reopening_a_held_ticket_while_naming_an_agent_is_refused(site, boss, agent, other_agent):
    pk = new_ticket(boss, "Scanner")
    assign(pk, agent, boss)
    data = form_data(site, change_url(pk), "ticket_form")
    data.update(status=["open"], assigned_to=[str(other_agent.pk)])

    response = site.post(change_url(pk), data)
    assert response.status_code == 200
    assert form_errors(response)[0].startswith("An open ticket has no agent")
    assert (holder(pk), Ticket.objects.get(pk=pk).status) == (agent.pk, "assigned")
    assert [kind for kind, _, _ in events(pk)] == ["created", "assigned"]


@pytest.mark.django_db
def test_a_form_opened_before_an_agent_took_the_ticket_only_sends_what_the_admin_changed(
    site, boss, agent
):
    pk = new_ticket(boss, "Headset crackles")
    data = form_data(site, change_url(pk), "ticket_form")  # rendered while in the pool
    services.tickets_top_up(agent_id=agent.pk)  # meanwhile the agent takes it
    assert holder(pk) == agent.pk
    data["priority"] = ["3"]

    response = site.post(change_url(pk), data)
    assert response.status_code == 302, form_errors(response)
    ticket = Ticket.objects.get(pk=pk)
    assert (ticket.priority, ticket.status) == (3, "assigned")
    assert holder(pk) == agent.pk  # not handed back to the pool by the stale "open"
    event = TicketEvent.objects.filter(ticket_id=pk).latest("id")
    assert (event.kind, event.changes) == ("edited", {"priority": ["normal", "urgent"]})
    assert_invariants()


@pytest.mark.django_db
def test_the_read_only_inlines_play_no_part_in_a_change(site, boss, agent):
    """Even without the inlines' management data (a tampered POST), the change applies once."""
    pk = new_ticket(boss, "Mouse")
    data = form_data(site, change_url(pk), "ticket_form")
    data = {name: value for name, value in data.items() if not name.startswith(("events", "assi"))}
    data["assigned_to"] = [str(agent.pk)]

    response = site.post(change_url(pk), data)
    assert response.status_code == 302, form_errors(response)
    assert holder(pk) == agent.pk
    assert [kind for kind, _, _ in events(pk)] == ["created", "assigned"]
    assert TicketEvent.objects.filter(ticket_id=pk).count() == 2
    assert TicketAssignment.objects.filter(ticket_id=pk).count() == 1


@pytest.mark.django_db
def test_changing_the_holder_and_releasing_through_the_form(site, boss, agent, other_agent):
    pk = new_ticket(boss, "Dock")
    assign(pk, agent, boss)

    data = form_data(site, change_url(pk), "ticket_form")
    data["assigned_to"] = [str(other_agent.pk)]
    assert site.post(change_url(pk), data).status_code == 302
    assert holder(pk) == other_agent.pk
    assert events(pk)[-1] == ("reassigned", boss.pk, other_agent.pk)

    data = form_data(site, change_url(pk), "ticket_form")
    data["assigned_to"] = [""]
    assert site.post(change_url(pk), data).status_code == 302
    assert (holder(pk), Ticket.objects.get(pk=pk).status) == (None, "open")
    assert events(pk)[-1][0] == "released"
    assert_invariants()


# --- Tickets: the action and deletion --------------------------------------------------------
@pytest.mark.django_db
def test_return_to_pool_action_releases_each_selected_ticket(site, boss, agent):
    held = new_ticket(boss, "held")
    resolved = new_ticket(boss, "resolved")
    pooled = new_ticket(boss, "already in the pool")
    untouched = new_ticket(boss, "not selected")
    for pk in (held, resolved, untouched):
        assign(pk, agent, boss)
    services.ticket_transition_by_agent(agent_id=agent.pk, ticket_id=resolved, to_status="resolved")

    response = site.post(
        TICKETS,
        {"action": "return_to_pool", "_selected_action": [held, resolved, pooled]},
        follow=True,
    )
    assert response.status_code == 200
    assert "Returned 2 ticket(s) to the pool." in response.content.decode()
    for pk in (held, resolved, pooled):
        assert (holder(pk), Ticket.objects.get(pk=pk).status) == (None, "open")
    assert holder(untouched) == agent.pk
    for pk in (held, resolved):
        assert events(pk)[-1] == ("released", boss.pk, agent.pk)
    assert [kind for kind, _, _ in events(pooled)] == ["created"]
    assert_invariants()


@pytest.mark.django_db
def test_deleting_a_ticket_goes_through_the_service(site, boss, agent):
    pk = new_ticket(boss, "to delete")
    assign(pk, agent, boss)
    confirm = site.get(f"{TICKETS}{pk}/delete/")
    assert confirm.status_code == 200
    assert not confirm.context["perms_lacking"]  # assignments go with the ticket

    response = site.post(f"{TICKETS}{pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Ticket.objects.filter(pk=pk).exists()
    assert not TicketAssignment.objects.filter(ticket_id=pk).exists()
    assert events(pk)[-1] == ("deleted", boss.pk, agent.pk)
    assert LogEntry.objects.filter(object_id=str(pk), action_flag=DELETION).count() == 1

    first, second = new_ticket(boss, "a"), new_ticket(boss, "b")
    assign(first, agent, boss)
    response = site.post(
        TICKETS, {"action": "delete_selected", "_selected_action": [first, second], "post": "yes"}
    )
    assert response.status_code == 302
    assert not Ticket.objects.filter(pk__in=[first, second]).exists()
    assert events(first)[-1] == ("deleted", boss.pk, agent.pk)
    assert events(second)[-1] == ("deleted", boss.pk, None)
    assert_invariants()


@pytest.mark.django_db
def test_a_refused_deletion_says_why_and_keeps_the_ticket(site, boss, monkeypatch):
    pk = new_ticket(boss, "kept")

    def refuse(**kwargs):
        raise services.ConcurrentChange("The ticket kept changing while it was being deleted.")

    monkeypatch.setattr(services, "ticket_delete", refuse)
    response = site.post(f"{TICKETS}{pk}/delete/", {"post": "yes"}, follow=True)
    assert response.status_code == 200
    page = response.content.decode()
    assert "kept changing while it was being deleted" in page
    assert "deleted successfully" not in page
    assert Ticket.objects.filter(pk=pk).exists()
    assert not LogEntry.objects.filter(action_flag=DELETION).exists()


@pytest.mark.django_db(transaction=True)
def test_the_service_runs_in_its_own_transaction_not_inside_the_page(client, monkeypatch):
    """Django wraps a change form's POST in atomic(); here the service commits on its own, so
    its agent and ticket locks are released before the rest of the page runs."""
    boss, agent = make_superuser(), create_user(agent=True)
    client.force_login(boss)
    pk = new_ticket(boss, "short locks")
    nested = []
    update = services.ticket_update

    def spy(**kwargs):
        nested.append(connection.in_atomic_block)
        return update(**kwargs)

    monkeypatch.setattr(services, "ticket_update", spy)
    data = form_data(client, change_url(pk), "ticket_form")
    data["assigned_to"] = [str(agent.pk)]
    assert client.post(change_url(pk), data).status_code == 302
    assert nested == [False]
    assert holder(pk) == agent.pk


# --- Assignments and history: read-only -------------------------------------------------------
@pytest.mark.django_db
@pytest.mark.parametrize("model", ["ticketassignment", "ticketevent"])
def test_assignment_and_event_admins_are_read_only(site, boss, agent, model):
    pk = new_ticket(boss, "seen")
    assign(pk, agent, boss)
    base = f"/admin/support/{model}/"
    obj = (TicketAssignment if model == "ticketassignment" else TicketEvent).objects.latest("id")

    listing = site.get(base)
    assert listing.status_code == 200
    assert listing.context["cl"].result_count >= 1
    assert "delete_selected" not in listing.content.decode()
    view = site.get(f"{base}{obj.pk}/change/")
    assert view.status_code == 200
    assert view.context["has_change_permission"] is False
    assert site.get(f"{base}add/").status_code == 403
    assert site.post(f"{base}add/", {}).status_code == 403
    assert site.post(f"{base}{obj.pk}/change/", {"is_active": ""}).status_code == 403
    assert site.post(f"{base}{obj.pk}/delete/", {"post": "yes"}).status_code == 403
    assert holder(pk) == agent.pk
    assert TicketEvent.objects.filter(ticket_id=pk).count() == 2


@pytest.mark.django_db
def test_events_of_a_deleted_ticket_stay_listed(site, boss):
    pk = new_ticket(boss, "short-lived")
    services.ticket_delete(ticket_id=pk, actor_id=boss.pk)
    response = site.get("/admin/support/ticketevent/")
    assert response.status_code == 200
    assert f"#{pk}" in response.content.decode()


# --- Users and agents ------------------------------------------------------------------------
@pytest.mark.django_db
def test_user_list_shows_agents_with_their_load_and_filters_them(site, boss, agent, other_agent):
    assign(new_ticket(boss), agent, boss)
    response = site.get(USERS + "?agent=yes")
    assert response.status_code == 200
    rows = {user.username: user for user in response.context["cl"].result_list}
    assert set(rows) == {agent.username, other_agent.username}
    assert rows[agent.username]._assigned_count == 1
    assert "assigned tickets" in response.content.decode().lower()
    response = site.get(USERS + "?agent=no")
    assert {user.username for user in response.context["cl"].result_list} == {boss.username}


@pytest.mark.django_db
def test_unticking_active_on_an_agent_returns_its_tickets_to_the_pool(site, boss, agent):
    held = [new_ticket(boss, f"held {n}") for n in range(2)]
    done = new_ticket(boss, "done")
    for pk in [*held, done]:
        assign(pk, agent, boss)
    services.ticket_transition_by_agent(agent_id=agent.pk, ticket_id=done, to_status="resolved")

    url = f"{USERS}{agent.pk}/change/"
    data = form_data(site, url, "user_form")
    assert data.pop("is_active") == ["on"]
    response = site.post(url, data)
    assert response.status_code == 302
    agent.refresh_from_db()
    assert not agent.is_active
    assert agent.groups.filter(name="agents").exists()  # still an agent, a deactivated one
    for pk in held:
        assert (holder(pk), Ticket.objects.get(pk=pk).status) == (None, "open")
        assert events(pk)[-1] == ("released", boss.pk, agent.pk)
    assert holder(done) == agent.pk  # resolved keeps its record
    assert not Token.objects.filter(user=agent).exists()
    assert_invariants()


@pytest.mark.django_db
def test_removing_a_user_from_the_agents_group_returns_its_tickets_to_the_pool(site, boss, agent):
    held = new_ticket(boss, "held")
    done = new_ticket(boss, "done")
    for pk in (held, done):
        assign(pk, agent, boss)
    services.ticket_transition_by_agent(agent_id=agent.pk, ticket_id=done, to_status="resolved")

    url = f"{USERS}{agent.pk}/change/"
    data = form_data(site, url, "user_form")
    data["groups"] = []
    assert site.post(url, data).status_code == 302
    agent.refresh_from_db()
    assert agent.is_active
    assert not agent.groups.filter(name="agents").exists()
    assert (holder(held), Ticket.objects.get(pk=held).status) == (None, "open")
    assert events(held)[-1] == ("released", boss.pk, agent.pk)
    assert holder(done) == agent.pk  # resolved keeps its record
    assert_invariants()


@pytest.mark.django_db
def test_a_username_differing_only_in_case_is_refused_on_add_and_on_rename(site, agent):
    before = list(services.User.objects.order_by("pk").values_list("pk", "username"))
    taken = agent.username.upper()
    data = form_data(site, f"{USERS}add/", "user_form")
    data.update(username=[taken], usable_password=["true"])
    data.update(password1=["A-long-enough-Passw0rd"], password2=["A-long-enough-Passw0rd"])
    response = site.post(f"{USERS}add/", data)
    assert response.status_code == 200
    assert form_errors(response) == ["A user with that username already exists."]

    other = create_user()
    url = f"{USERS}{other.pk}/change/"
    data = form_data(site, url, "user_form")
    data["username"] = [taken]
    response = site.post(url, data)
    assert response.status_code == 200
    assert form_errors(response) == ["A user with that username already exists."]
    assert list(services.User.objects.order_by("pk").values_list("pk", "username")) == [
        *before,
        (other.pk, other.username),
    ]
    # a user's own name in another case is a rename, not a clash
    data["username"] = [other.username.upper()]
    assert site.post(url, data).status_code == 302
    assert services.User.objects.get(pk=other.pk).username == other.username.upper()


@pytest.mark.django_db
def test_editing_an_agent_without_deactivating_it_keeps_its_tickets(site, boss, agent):
    pk = new_ticket(boss)
    assign(pk, agent, boss)
    url = f"{USERS}{agent.pk}/change/"
    data = form_data(site, url, "user_form")
    data["email"] = ["agent@example.com"]
    assert site.post(url, data).status_code == 302
    agent.refresh_from_db()
    assert (agent.email, agent.is_active) == ("agent@example.com", True)
    assert holder(pk) == agent.pk


@pytest.mark.django_db
def test_deactivate_agents_action_goes_through_the_service(site, boss, agent):
    pk = new_ticket(boss)
    assign(pk, agent, boss)
    response = site.post(
        USERS, {"action": "deactivate_agents", "_selected_action": [agent.pk, boss.pk]}
    )
    assert response.status_code == 302
    agent.refresh_from_db()
    boss.refresh_from_db()
    assert (agent.is_active, boss.is_active) == (False, True)  # only agents are deactivated
    assert (holder(pk), Ticket.objects.get(pk=pk).status) == (None, "open")
    assert events(pk)[-1] == ("released", boss.pk, agent.pk)
    assert_invariants()


# --- In a real browser -----------------------------------------------------------------------
SERVER_CAP = 2
PASSWORD = "a-browser-passphrase-7"


@pytest.fixture
def server(transactional_db):
    """uvicorn serving the project on the test database, with the cap at SERVER_CAP."""
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DJANGO_DEBUG": "1",
        "DJANGO_SECRET_KEY": "browser-test-secret-key-0123456789-abcdefghijklmnop",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
        "DJANGO_SECURE_SSL_REDIRECT": "0",
        "DATABASE_URL": database_url(),
        "SUPPORT_AGENT_MAX_TICKETS": str(SERVER_CAP),
        "DB_POOL_MIN_SIZE": "0",
        "DB_POOL_MAX_SIZE": "4",
    }
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "uvicorn", "project.asgi:application"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--lifespan", "off"]
    url = f"http://127.0.0.1:{port}"
    with open(ARTIFACTS / "server.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while True:
                assert process.poll() is None, "uvicorn exited; see server.log"
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "uvicorn did not start within 20 s"
                time.sleep(0.1)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


@pytest.mark.django_db(transaction=True)
def test_admin_site_in_a_real_browser(server):
    from playwright.sync_api import expect, sync_playwright

    boss = make_superuser()
    # The server hashes with Django's defaults, not the tests' MD5: store a PBKDF2 hash (few
    # iterations; the server upgrades it at login).
    hasher = PBKDF2PasswordHasher()
    boss.password = hasher.encode(PASSWORD, hasher.salt(), iterations=1000)
    boss.save(update_fields=["password"])
    agent = create_user(agent=True)
    assign(new_ticket(boss, "Already held"), agent, boss)  # the agent holds 1 of SERVER_CAP
    waiting = new_ticket(boss, "Waiting in the pool")

    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    shots = iter(range(1, 100))

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(10_000)
        page.set_default_navigation_timeout(15_000)

        def shot(name: str) -> None:
            page.screenshot(path=ARTIFACTS / f"{next(shots):02d}-{name}.png", full_page=True)

        try:
            page.goto(f"{server}/admin/login/?next=/admin/")
            shot("login")
            page.fill("#id_username", boss.username)
            page.fill("#id_password", PASSWORD)
            with page.expect_navigation():
                page.click("input[type=submit]")
            expect(page.locator("#site-name")).to_be_visible()
            assert page.url == f"{server}/admin/"
            shot("admin-index")

            page.goto(f"{server}{TICKETS}add/")
            page.fill("#id_title", "Printer on fire")
            page.fill("#id_description", "Smoke from tray 2.")
            page.select_option("#id_priority", label="urgent")
            shot("ticket-add-form")
            with page.expect_navigation():
                page.click("input[name=_continue]")
            match = re.search(r"/admin/support/ticket/(\d+)/change/$", page.url)
            assert match, page.url
            created = int(match.group(1))
            expect(page.locator("ul.messagelist")).to_contain_text("was added successfully")
            shot("ticket-created")

            page.select_option("#id_assigned_to", value=str(agent.pk))
            with page.expect_navigation():
                page.click("input[name=_continue]")
            expect(page.locator("ul.messagelist")).to_contain_text("was changed successfully")
            expect(page.locator("#id_assigned_to")).to_have_value(str(agent.pk))
            shot("ticket-assigned")

            page.goto(f"{server}{change_url(waiting)}")
            page.select_option("#id_assigned_to", value=str(agent.pk))
            with page.expect_navigation():
                page.click("input[name=_save]")
            refusal = (
                f"Agent {agent.username} (id {agent.pk}) already holds {SERVER_CAP} assigned"
                " tickets (the cap)."
            )
            expect(page.locator(".errornote")).to_be_visible()
            expect(page.locator("ul.errorlist")).to_contain_text(refusal)
            shot("cap-refused")

            page.goto(f"{server}/api/docs/")
            expect(page.get_by_text("/api/agent/tickets/").first).to_be_visible(timeout=30_000)
            shot("api-docs")
        except Exception:
            shot("failure")
            raise
        finally:
            browser.close()

    assert holder(created) == agent.pk
    assert events(created) == [("created", boss.pk, None), ("assigned", boss.pk, agent.pk)]
    assert Ticket.objects.get(pk=created).priority == Ticket.Priority.URGENT
    assert (holder(waiting), Ticket.objects.get(pk=waiting).status) == (None, "open")
    assert [kind for kind, _, _ in events(waiting)] == ["created"]
    assert len(services.held_tickets(agent.pk)) == SERVER_CAP
    assert_invariants()
