"""The four guarantees under real concurrency: parallel requests and threads, each on its own
database connection, with committed transactions (no test transaction hides a race)."""

import asyncio
import threading
import time

import pytest
from django.db import IntegrityError, connection, connections, transaction
from django.db.models import F
from django.utils import timezone

from support import services
from support.models import Ticket, TicketAssignment, TicketEvent
from support.services import locks
from tests.conftest import create_tickets, create_user, run_sync, until_a_lock_wait
from tests.invariants import assert_invariants, held_ticket_ids

pytestmark = pytest.mark.django_db(transaction=True)


def _run_in_threads(count, target):
    """Start ``count`` threads that each wait at a barrier, then call ``target(i)``."""
    barrier = threading.Barrier(count)
    results, errors = [None] * count, []

    def work(i):
        try:
            barrier.wait()
            results[i] = target(i)
        except Exception as exc:  # reported by the caller
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a worker hung"
    return results, errors


# --- Guarantee 3 (and 1): agents do not block each other and never share a ticket ----------
@pytest.mark.smoke
async def test_twenty_agents_fetching_at_once_each_get_fifteen_disjoint(make_client, admin):
    await run_sync(create_tickets, admin, 300)
    agents = [await run_sync(create_user, agent=True) for _ in range(20)]
    responses = await asyncio.gather(
        *(make_client(a.token).get("/api/agent/tickets/") for a in agents)
    )
    assert [r.status_code for r in responses] == [200] * 20
    sets = [{t["id"] for t in r.json()} for r in responses]
    assert [len(s) for s in sets] == [15] * 20
    assert len(set().union(*sets)) == 300  # disjoint, and the pool is used up exactly
    for agent, held in zip(agents, sets, strict=True):
        assert await run_sync(held_ticket_ids, agent.pk) == held
    assert await Ticket.objects.filter(status="open").acount() == 0
    await run_sync(assert_invariants)


# --- Guarantee 2: one agent's own concurrent calls queue on its row --------------------------
@pytest.mark.smoke
async def test_one_agent_firing_25_fetches_at_once_ends_with_exactly_15(agent_client, admin, agent):
    await run_sync(create_tickets, admin, 200)
    responses = await asyncio.gather(*(agent_client.get("/api/agent/tickets/") for _ in range(25)))
    assert [r.status_code for r in responses] == [200] * 25
    answers = [sorted(t["id"] for t in r.json()) for r in responses]
    assert all(answer == answers[0] for answer in answers)
    assert len(answers[0]) == 15
    assert await run_sync(held_ticket_ids, agent.pk) == set(answers[0])
    assert await TicketAssignment.objects.acount() == 15
    await run_sync(assert_invariants)


def test_one_agent_topping_up_from_eight_threads_at_once_holds_exactly_15(admin, agent):
    create_tickets(admin, 200)
    results, errors = _run_in_threads(8, lambda i: services.tickets_top_up(agent_id=agent.pk))
    assert errors == []
    assert all(len(rows) == 15 for rows in results)
    assert held_ticket_ids(agent.pk) == {row["id"] for row in results[0]}
    assert TicketAssignment.objects.count() == 15
    assert_invariants()


async def test_admin_assigning_while_agent_fetches_never_passes_the_cap(
    admin_client, agent_client, admin, agent
):
    tickets = await run_sync(create_tickets, admin, 40)
    # the admin targets the tickets the pool would hand out first, so the two race for them
    admin_calls = [
        admin_client.patch(f"/api/tickets/{t.pk}/", json={"assigned_to": agent.pk})
        for t in tickets[:12]
    ]
    agent_calls = [agent_client.get("/api/agent/tickets/") for _ in range(12)]
    mixed = [call for pair in zip(admin_calls, agent_calls, strict=True) for call in pair]
    responses = await asyncio.gather(*mixed)
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 409}, [r.text for r in responses if r.status_code >= 500]
    for r in responses[1::2]:  # agent answers
        assert len(r.json()) <= 15
    for r in responses[0::2]:
        if r.status_code == 409:
            assert "cap" in r.json()["detail"]
    assert len(await run_sync(held_ticket_ids, agent.pk)) == 15
    await run_sync(assert_invariants)


def test_admin_assignments_from_many_threads_respect_the_cap(admin, agent):
    tickets = create_tickets(admin, 30)

    def assign(i):
        try:
            services.ticket_update(
                ticket_id=tickets[i].pk, changes={"assigned_to": agent.pk}, actor_id=admin.pk
            )
        except services.AgentAtCapacity:
            return "refused"
        return "assigned"

    results, errors = _run_in_threads(30, assign)
    assert errors == []
    assert results.count("assigned") == 15
    assert results.count("refused") == 15
    assert len(held_ticket_ids(agent.pk)) == 15
    assert_invariants()


async def test_agents_racing_with_transitions_reassignments_and_deactivation(
    make_client, admin_client, admin
):
    await run_sync(create_tickets, admin, 120)
    agents = [await run_sync(create_user, agent=True) for _ in range(6)]
    clients = [make_client(a.token) for a in agents]
    first = await asyncio.gather(*(c.get("/api/agent/tickets/") for c in clients))
    held = [[t["id"] for t in r.json()] for r in first]

    calls = []
    for i, client in enumerate(clients):
        calls.append(client.get("/api/agent/tickets/"))
        calls.append(
            client.post("/api/agent/tickets/", json={"ticket_id": held[i][0], "status": "resolved"})
        )
        calls.append(client.get("/api/agent/tickets/"))
        # the admin moves one of this agent's tickets to the next agent
        calls.append(
            admin_client.patch(
                f"/api/tickets/{held[i][1]}/", json={"assigned_to": agents[(i + 1) % 6].pk}
            )
        )
        calls.append(admin_client.patch(f"/api/tickets/{held[i][2]}/", json={"status": "open"}))
    calls.append(admin_client.delete(f"/api/agents/{agents[0].pk}/"))
    responses = await asyncio.gather(*calls)
    assert all(r.status_code < 500 for r in responses), [r.text for r in responses]
    # 400: assigning to the agent deactivated meanwhile; 409: the cap or the state machine
    assert {r.status_code for r in responses} <= {200, 204, 400, 401, 404, 409}
    await run_sync(assert_invariants)
    assert await run_sync(held_ticket_ids, agents[0].pk) == set()


# --- Guarantee 3 again: a locked ticket is skipped, never waited for -------------------------
async def test_fetch_skips_tickets_locked_by_another_transaction(agent_client, admin):
    tickets = await run_sync(create_tickets, admin, 30)
    locked_ids = [t.pk for t in tickets[:5]]
    holding, release = threading.Event(), threading.Event()

    def hold_locks():
        try:
            with transaction.atomic():
                list(Ticket.objects.select_for_update().filter(pk__in=locked_ids))
                holding.set()
                release.wait(timeout=30)
        finally:
            connection.close()

    holder = threading.Thread(target=hold_locks)
    holder.start()
    try:
        assert await asyncio.to_thread(holding.wait, 10)
        r = await agent_client.get("/api/agent/tickets/")
        assert r.status_code == 200  # a wait would end in the lock timeout's 503
        taken = {t["id"] for t in r.json()}
        assert len(taken) == 15
        assert taken.isdisjoint(locked_ids)
    finally:
        release.set()
        await asyncio.to_thread(holder.join, 30)


# --- Guarantee 1: the database itself refuses a second active assignment --------------------
@pytest.mark.smoke
def test_database_refuses_a_second_active_assignment_when_code_is_bypassed(admin, agent):
    other = create_user(agent=True)
    [ticket] = create_tickets(admin, 1)
    TicketAssignment.objects.create(ticket=ticket, agent=agent)
    with pytest.raises(IntegrityError), transaction.atomic():
        TicketAssignment.objects.create(ticket=ticket, agent=other)
    with pytest.raises(IntegrityError), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO support_ticketassignment"
            " (ticket_id, agent_id, assigned_at, is_active)"
            " VALUES (%s, %s, CURRENT_TIMESTAMP, %s)",
            [ticket.pk, other.pk, True],
        )
    # inactive rows (the history) may repeat freely
    TicketAssignment.objects.create(ticket=ticket, agent=other, is_active=False)
    TicketAssignment.objects.create(ticket=ticket, agent=other, is_active=False)
    assert TicketAssignment.objects.filter(ticket=ticket, is_active=True).count() == 1


def _wait_until_blocked_on_a_lock(count=1, timeout=10.0):
    """Wait until ``count`` other sessions are waiting for a lock (PostgreSQL only)."""

    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            if cursor.fetchone()[0] >= count:
                return
            time.sleep(0.02)
    raise AssertionError("no session started waiting for the lock")


@pytest.mark.parametrize(
    "changes",
    [{"status": "open"}, {"assigned_to": None}, {"title": "edited meanwhile"}],
)
def test_admin_edit_waiting_on_a_top_up_sees_the_new_holder(admin, agent, changes):
    """An admin edit that waits for a ticket lock held by a top-up in progress must decide on
    the holder that top-up committed, not on the one it read before waiting."""
    if connection.vendor != "postgresql":
        pytest.fail("this race needs row locks: run on PostgreSQL")
    [ticket] = create_tickets(admin, 1)
    picked, commit = threading.Event(), threading.Event()

    def top_up_in_progress():
        # what tickets_top_up does, paused between taking the ticket and committing
        try:
            with transaction.atomic():
                locks.lock_users([agent.pk])
                list(
                    Ticket.objects.select_for_update(no_key=True, skip_locked=True).filter(
                        pk=ticket.pk, status="open"
                    )
                )
                now = timezone.now()
                Ticket.objects.filter(pk=ticket.pk).update(
                    status="assigned", assigned_to=agent, assigned_at=now, version=F("version") + 1
                )
                TicketAssignment.objects.create(ticket=ticket, agent=agent, assigned_at=now)
                TicketEvent.objects.create(
                    ticket=ticket,
                    actor=agent,
                    kind="assigned",
                    agent=agent,
                    changes={"status": ["open", "assigned"], "assigned_to": [None, agent.pk]},
                )
                picked.set()
                commit.wait(timeout=30)
        finally:
            connection.close()

    outcome = {}

    def admin_edit():
        try:
            outcome["row"] = services.ticket_update(
                ticket_id=ticket.pk, changes=changes, actor_id=admin.pk
            )
        except services.ServiceError as exc:
            outcome["refused"] = exc
        finally:
            connection.close()

    fetch = threading.Thread(target=top_up_in_progress)
    fetch.start()
    assert picked.wait(10)
    edit = threading.Thread(target=admin_edit)
    edit.start()
    try:
        _wait_until_blocked_on_a_lock()
    finally:
        commit.set()
        fetch.join(30)
        edit.join(30)
    assert "refused" not in outcome, outcome.get("refused")
    row = outcome["row"]
    if "title" in changes:
        assert (row["status"], row["assigned_to_id"]) == ("assigned", agent.pk)
    else:
        assert (row["status"], row["assigned_to_id"]) == ("open", None)
    assert_invariants()


@pytest.mark.parametrize("action", ["move", "fetch"])
async def test_an_agent_demoted_while_its_request_waits_for_its_row_is_refused(
    make_client, admin, action
):
    """The role is read after the agent's row lock: an admin's transaction that holds the row
    and takes the agent out of the agents group decides what the waiting request may do."""
    import psycopg

    from tests.servers import psycopg_conninfo

    agent = await run_sync(create_user, agent=True)
    await run_sync(create_tickets, admin, 3)
    held = [t["id"] for t in (await make_client(agent.token).get("/api/agent/tickets/")).json()]
    if action == "fetch":
        for ticket in held:  # hand them back: the fetch will have work to take
            await make_client(agent.token).post(f"/api/agent/tickets/{ticket}/release/")
    before = await run_sync(lambda: list(Ticket.objects.order_by("pk").values()))
    with psycopg.connect(psycopg_conninfo("demotion-test")) as admin_tx:
        admin_tx.execute("SELECT 1 FROM auth_user WHERE id = %s FOR UPDATE", [agent.pk])
        admin_tx.execute("DELETE FROM auth_user_groups WHERE user_id = %s", [agent.pk])
        client = make_client(agent.token)
        if action == "move":
            request = client.post(
                "/api/agent/tickets/", json={"ticket_id": held[0], "status": "resolved"}
            )
        else:
            request = client.get("/api/agent/tickets/")
        task = asyncio.create_task(request)
        await until_a_lock_wait(admin_tx)  # the request waits for the agent's row
        admin_tx.commit()
        response = await task
    assert response.status_code == 403, response.text
    assert await run_sync(lambda: list(Ticket.objects.order_by("pk").values())) == before
