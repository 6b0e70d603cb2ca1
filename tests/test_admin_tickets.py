"""The admin ticket API: create, list (pages, filters, order, counts, cursors, search), read,
PUT/PATCH rules, delete."""

import asyncio
import base64
import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from support import services
from support.models import Ticket, TicketAssignment
from tests.conftest import TICKET_KEYS, create_held, create_tickets, create_user, run_sync

pytestmark = pytest.mark.django_db(transaction=True)


def _ticket(pk):
    return Ticket.objects.get(pk=pk)


def _active_assignments(pk):
    return list(
        TicketAssignment.objects.filter(ticket_id=pk, is_active=True).values_list(
            "agent_id", flat=True
        )
    )


async def _assign(admin_client, pk, agent_id):
    r = await admin_client.patch(f"/api/tickets/{pk}/", json={"assigned_to": agent_id})
    assert r.status_code == 200, r.text
    return r.json()


# --- create ---------------------------------------------------------------------------------
@pytest.mark.smoke
async def test_admin_creates_open_ticket_owned_by_caller(admin_client, admin):
    r = await admin_client.post(
        "/api/tickets/", json={"title": "  Printer on fire  ", "description": "Smoke."}
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) == TICKET_KEYS
    assert body["title"] == "Printer on fire"
    assert body["status"] == "open"
    assert body["priority"] == "normal"
    assert body["created_by"] == admin.pk
    assert body["assigned_to"] is None
    assert body["assigned_at"] is None
    assert body["created_at"].endswith("Z")
    stored = await run_sync(_ticket, body["id"])
    assert stored.title == "Printer on fire"
    assert stored.created_by_id == admin.pk


async def test_create_ignores_read_only_status_and_assignee(admin_client, agent):
    r = await admin_client.post(
        "/api/tickets/",
        json={"title": "t", "priority": "urgent", "status": "closed", "assigned_to": agent.pk},
    )
    assert r.status_code == 201
    body = r.json()
    assert (body["status"], body["assigned_to"], body["priority"]) == ("open", None, "urgent")
    assert await run_sync(_active_assignments, body["id"]) == []


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({}, "title"),
        ({"title": ""}, "title"),
        ({"title": "   "}, "title"),
        ({"title": "x" * 201}, "title"),
        ({"title": "ok", "description": "d" * 10_001}, "description"),
        ({"title": "ok", "priority": "critical"}, "priority"),
        ({"title": ["not", "a", "string"]}, "title"),
    ],
)
async def test_create_refuses_invalid_fields(admin_client, payload, field):
    r = await admin_client.post("/api/tickets/", json=payload)
    assert r.status_code == 400
    assert field in r.json()
    assert await Ticket.objects.acount() == 0


async def test_create_accepts_limits_exactly(admin_client):
    r = await admin_client.post(
        "/api/tickets/", json={"title": "x" * 200, "description": "d" * 10_000}
    )
    assert r.status_code == 201


# --- read -----------------------------------------------------------------------------------
async def test_get_one_ticket_and_404(admin_client, admin):
    [ticket] = await run_sync(create_tickets, admin, 1)
    r = await admin_client.get(f"/api/tickets/{ticket.pk}/")
    assert r.status_code == 200
    assert r.json()["id"] == ticket.pk
    r = await admin_client.get(f"/api/tickets/{ticket.pk + 1000}/")
    assert r.status_code == 404
    assert "detail" in r.json()


# --- list: pages, filters, order ------------------------------------------------------------
async def _make_listing_data(admin, agent):
    def make():
        now = timezone.now()
        tickets = []
        for n in range(25):
            tickets.append(
                Ticket(
                    title=f"ticket {n}",
                    description="needle in the haystack" if n % 5 == 0 else "plain",
                    priority=n % 4,
                    created_by=admin,
                    created_at=now - timedelta(minutes=100 - n),
                )
            )
        return Ticket.objects.bulk_create(tickets)

    return await run_sync(make)


@pytest.mark.smoke
async def test_list_is_paginated_newest_first(admin_client, admin, agent):
    await _make_listing_data(admin, agent)
    r = await admin_client.get("/api/tickets/")
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == 25
    assert len(body["results"]) == 20
    assert body["previous"] is None
    assert body["next"].endswith("/api/tickets/?page=2")
    titles = [t["title"] for t in body["results"]]
    assert titles[0] == "ticket 24"
    assert titles[-1] == "ticket 5"

    r2 = await admin_client.get(body["next"])
    page2 = r2.json()
    assert [t["title"] for t in page2["results"]] == [f"ticket {n}" for n in range(4, -1, -1)]
    assert page2["next"] is None
    assert page2["previous"].endswith("/api/tickets/")


async def test_page_size_is_honoured_and_capped_at_100(admin_client, admin):
    await run_sync(create_tickets, admin, 105)
    r = await admin_client.get("/api/tickets/?page_size=7&page=3")
    body = r.json()
    assert len(body["results"]) == 7
    assert "page=4" in body["next"]
    assert "page_size=7" in body["next"]
    assert "page=2" in body["previous"]
    r = await admin_client.get("/api/tickets/?page_size=1000")
    assert len(r.json()["results"]) == 100


async def test_a_page_size_of_any_length_over_100_is_served_as_100(admin_client, admin):
    await run_sync(create_tickets, admin, 105)
    for size in ("101", "0150", "99999999999999999999", "9" * 5000):
        r = await admin_client.get("/api/tickets/", params={"page_size": size})
        assert r.status_code == 200, (size[:25], r.text[:200])
        assert len(r.json()["results"]) == 100
        assert r.json()["count"] == 105
        second = await admin_client.get(r.json()["next"])
        assert len(second.json()["results"]) == 5


async def test_page_last_serves_the_last_page(admin_client, admin, agent):
    await run_sync(create_tickets, admin, 5)
    r = await admin_client.get("/api/tickets/?page_size=2&page=last")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [t["title"] for t in body["results"]] == ["ticket 0"]  # the oldest
    assert body["next"] is None
    assert "page=2" in body["previous"]
    assert "page_size=2" in body["previous"]
    # with filters too: one high-priority ticket, so its last page is its first
    await run_sync(create_tickets, admin, 1, priority=Ticket.Priority.HIGH)
    r = await admin_client.get("/api/tickets/?priority=high&page=last")
    assert r.status_code == 200, r.text
    assert r.json()["count"] == 1
    assert r.json()["previous"] is None
    # an empty list has one empty page, its last
    r = await admin_client.get(f"/api/tickets/?assigned_to={agent.pk}&page=last")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "count": 0,
        "count_exact": True,
        "next": None,
        "previous": None,
        "results": [],
    }


async def test_page_past_the_end_is_404(admin_client, admin):
    await run_sync(create_tickets, admin, 3)
    assert (await admin_client.get("/api/tickets/?page=2")).status_code == 404
    assert (await admin_client.get("/api/tickets/?page=1")).status_code == 200


async def test_empty_list_has_one_empty_page(admin_client):
    r = await admin_client.get("/api/tickets/")
    assert r.json() == {
        "count": 0,
        "count_exact": True,
        "next": None,
        "previous": None,
        "results": [],
    }


async def test_filters_status_priority_assignee_and_search(admin_client, admin, agent):
    tickets = await _make_listing_data(admin, agent)
    await _assign(admin_client, tickets[0].pk, agent.pk)
    await _assign(admin_client, tickets[1].pk, agent.pk)

    r = await admin_client.get("/api/tickets/?status=assigned")
    assert {t["id"] for t in r.json()["results"]} == {tickets[0].pk, tickets[1].pk}

    r = await admin_client.get(f"/api/tickets/?assigned_to={agent.pk}")
    assert r.json()["count"] == 2

    r = await admin_client.get("/api/tickets/?priority=urgent&page_size=100")
    results = r.json()["results"]
    assert results
    assert all(t["priority"] == "urgent" for t in results)
    assert len(results) == len([t for t in tickets if t.priority == 3])

    r = await admin_client.get("/api/tickets/?status=open&status=assigned")
    assert r.json()["count"] == 25

    r = await admin_client.get("/api/tickets/?search=NEEDLE&page_size=100")
    assert r.json()["count"] == 5

    r = await admin_client.get("/api/tickets/?search=ticket 13")
    assert [t["title"] for t in r.json()["results"]] == ["ticket 13"]


async def test_ordering_by_priority_rank_and_dates(admin_client, admin, agent):
    await _make_listing_data(admin, agent)
    rank = {"low": 0, "normal": 1, "high": 2, "urgent": 3}

    r = await admin_client.get("/api/tickets/?ordering=priority&page_size=100")
    ranks = [rank[t["priority"]] for t in r.json()["results"]]
    assert ranks == sorted(ranks)
    assert ranks[0] == 0

    r = await admin_client.get("/api/tickets/?ordering=-priority&page_size=100")
    ranks = [rank[t["priority"]] for t in r.json()["results"]]
    assert ranks == sorted(ranks, reverse=True)
    assert ranks[0] == 3

    r = await admin_client.get("/api/tickets/?ordering=created_at&page_size=100")
    created = [t["created_at"] for t in r.json()["results"]]
    assert created == sorted(created)

    r = await admin_client.get("/api/tickets/?ordering=-updated_at")
    assert r.status_code == 200


async def test_pages_under_a_tied_ordering_neither_skip_nor_repeat(admin_client, admin):
    await run_sync(create_tickets, admin, 30)  # one priority for all: every row ties
    seen = []
    url = "/api/tickets/?ordering=priority&page_size=7"
    while url:
        body = (await admin_client.get(url)).json()
        seen += [t["id"] for t in body["results"]]
        url = body["next"]
    assert len(seen) == 30 == len(set(seen))


# --- list: counts, the count limit, cursors, search -----------------------------------------
async def _walk(client, url: str, link: str = "next") -> list[dict]:
    """Every page from ``url`` on, following ``link`` until it is null."""
    pages = []
    while url:
        response = await client.get(url)
        assert response.status_code == 200, (url, response.text)
        pages.append(response.json())
        url = pages[-1][link]
    return pages


def _ids(pages: list[dict]) -> list[int]:
    return [t["id"] for page in pages for t in page["results"]]


def _newest_first_ids() -> list[int]:
    return list(Ticket.objects.order_by("-created_at", "-id").values_list("pk", flat=True))


@pytest.mark.smoke
async def test_counts_are_exact_without_a_filter_and_with_statuses_only(admin_client, admin, agent):
    await run_sync(create_tickets, admin, 7)
    await run_sync(create_held, admin, agent, 3)
    await run_sync(create_held, admin, agent, 2, status="closed", priority=Ticket.Priority.HIGH)
    for query, count in (
        ("", 12),
        ("?status=open", 7),
        ("?status=assigned&status=closed&ordering=-priority", 5),
        ("?status=resolved", 0),
        ("?priority=high", 2),  # another filter: counted up to the limit, here exactly
        (f"?assigned_to={agent.pk}&status=assigned", 3),
    ):
        body = (await admin_client.get(f"/api/tickets/{query}")).json()
        assert (body["count"], body["count_exact"]) == (count, True), query
        assert type(body["count"]) is int, query
        assert list(body) == ["count", "count_exact", "next", "previous", "results"]


async def test_a_count_past_the_limit_says_so_and_every_page_still_works(
    admin_client, admin, settings
):
    settings.SUPPORT_LIST_COUNT_LIMIT = 5
    await run_sync(create_tickets, admin, 12, priority=Ticket.Priority.HIGH)
    await run_sync(create_tickets, admin, 3)
    high = await run_sync(
        lambda: list(
            Ticket.objects.filter(priority=Ticket.Priority.HIGH)
            .order_by("-created_at", "-id")
            .values_list("pk", flat=True)
        )
    )

    pages = await _walk(admin_client, "/api/tickets/?priority=high&page_size=5")
    assert [(p["count"], p["count_exact"]) for p in pages] == [(5, False)] * 3
    assert _ids(pages) == high
    assert [len(p["results"]) for p in pages] == [5, 5, 2]
    links = [(p["previous"], p["next"]) for p in pages]
    assert links[0][0] is None
    assert "page=2" in links[0][1]
    assert "page=" not in links[1][0].replace("page_size=", "")
    assert "page=3" in links[1][1]
    assert "page=2" in links[2][0]
    assert links[2][1] is None

    r = await admin_client.get("/api/tickets/?priority=high&page_size=5&page=4")
    assert r.status_code == 404
    r = await admin_client.get("/api/tickets/?priority=high&page=last")
    assert r.status_code == 400
    assert "?cursor=" in r.json()["page"][0]
    # exactly the limit is an exact count, and then the last page is served
    settings.SUPPORT_LIST_COUNT_LIMIT = 12
    r = await admin_client.get("/api/tickets/?priority=high&page=last&page_size=5")
    assert r.status_code == 200, r.text
    assert (r.json()["count"], r.json()["count_exact"], len(r.json()["results"])) == (12, True, 2)
    # no filter, or statuses only: the counters, exact past any limit
    settings.SUPPORT_LIST_COUNT_LIMIT = 1
    for query in ("?page=last", "?status=open&page=last"):
        r = await admin_client.get(f"/api/tickets/{query}")
        assert r.status_code == 200, (query, r.text)
        assert (r.json()["count"], r.json()["count_exact"]) == (15, True)


@pytest.mark.smoke
async def test_a_cursor_walk_sees_every_ticket_once_in_order_ties_included(admin_client, admin):
    now = timezone.now()

    def make():
        # bulk loaded: 23 tickets share one timestamp, 14 others have their own
        Ticket.objects.bulk_create(
            Ticket(title=f"tied {n}", created_by=admin, created_at=now) for n in range(23)
        )
        Ticket.objects.bulk_create(
            Ticket(title=f"own {n}", created_by=admin, created_at=now - timedelta(seconds=n))
            for n in range(1, 15)
        )

    await run_sync(make)
    newest = await run_sync(_newest_first_ids)
    pages = await _walk(admin_client, "/api/tickets/?cursor=&page_size=5")
    assert _ids(pages) == newest
    assert [len(p["results"]) for p in pages] == [5] * 7 + [2]
    assert pages[0]["previous"] is None
    assert all("cursor=" in p["previous"] for p in pages[1:])
    assert all(p["count"] == 37 and p["count_exact"] for p in pages)
    assert all("page_size=5" in p["next"] for p in pages[:-1])
    # and back, from the last page to the first
    back = await _walk(admin_client, pages[-1]["previous"], link="previous")
    assert back[-1]["previous"] is None
    assert [_ids([p]) for p in reversed(back)] == [_ids([p]) for p in pages[:-1]]
    # a previous page's next link leads forward again
    again = await admin_client.get(back[0]["next"])
    assert _ids([again.json()]) == _ids([pages[-1]])


async def test_a_cursor_walk_while_tickets_are_created_sees_each_ticket_once(admin_client, admin):
    """A creator adds tickets throughout the walk: walking on (next) shows exactly the tickets
    that were there when the first page was read, once each; going back (previous) from the
    end shows every other ticket once, the new ones included."""
    await run_sync(create_tickets, admin, 40)
    before = await run_sync(_newest_first_ids)
    created: list[int] = []
    stop, made = threading.Event(), threading.Semaphore(0)

    def creator():
        try:
            while not stop.is_set():
                row = services.ticket_create(
                    title="created meanwhile", description="", priority=1, created_by_id=admin.pk
                )
                created.append(row["id"])
                made.release()
        finally:
            connection.close()

    pages = [(await admin_client.get("/api/tickets/?cursor=&page_size=6")).json()]
    thread = threading.Thread(target=creator)
    thread.start()
    try:
        url = pages[0]["next"]
        while url:
            await asyncio.to_thread(made.acquire)  # at least one more ticket before each page
            pages.append((await admin_client.get(url)).json())
            url = pages[-1]["next"]
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
    assert len(created) >= len(pages) >= 7
    assert _ids(pages) == before
    back = await _walk(admin_client, pages[-1]["previous"], link="previous")
    seen = _ids(back)
    assert len(seen) == len(set(seen))
    assert set(seen) == (set(before) | set(created)) - set(_ids(pages[-1:]))
    assert back[-1]["previous"] is None


@pytest.mark.smoke
async def test_a_cursor_walks_a_filtered_list(admin_client, admin, agent):
    tickets = await _make_listing_data(admin, agent)
    needles = [t.pk for t in reversed(tickets) if t.description.startswith("needle")]
    pages = await _walk(admin_client, "/api/tickets/?cursor=&search=needle&page_size=2")
    assert _ids(pages) == needles
    assert all((p["count"], p["count_exact"]) == (5, True) for p in pages)
    assert all("search=needle" in p["next"] for p in pages[:-1])
    urgent = [t.pk for t in reversed(tickets) if t.priority == 3]
    pages = await _walk(admin_client, "/api/tickets/?priority=urgent&cursor=&status=open")
    assert _ids(pages) == urgent


async def test_a_cursor_is_refused_with_page_or_ordering_and_when_it_is_not_ours(
    admin_client, admin
):
    await run_sync(create_tickets, admin, 3)
    first = (await admin_client.get("/api/tickets/?cursor=&page_size=1")).json()
    good = first["next"].split("cursor=", 1)[1].split("&", 1)[0]
    assert (await admin_client.get(f"/api/tickets/?cursor={good}")).status_code == 200
    for query in (
        f"cursor={good}&page=2",
        "cursor=&page=1",
        "cursor=&ordering=-created_at",
        f"cursor={good}&ordering=",
    ):
        r = await admin_client.get(f"/api/tickets/?{query}")
        assert r.status_code == 400, query
        assert "page and ordering" in r.json()["cursor"][0], query
    encode = lambda text: base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")  # noqa: E731
    for bad in (
        "garbage!",
        good + "=",
        good + "AAAA",
        "x" * 65,
        encode("n:1700000000000000"),
        encode("q:1700000000000000:1"),
        encode("n:1700000000000000:0"),
        encode("n:99999999999999999999:1"),
        encode("n:-99999999999999999:1"),
        encode("n:1700000000000000:99999999999999999999"),
        encode("n:1.5:1"),
        encode("n: 1:1"),
        base64.urlsafe_b64encode(b"\xff\xfe:1:1").decode(),
    ):
        r = await admin_client.get("/api/tickets/", params={"cursor": bad})
        assert r.status_code == 400, bad
        assert r.json() == {
            "cursor": ["Invalid cursor: use the next and previous links as they are."]
        }


@pytest.mark.smoke
async def test_a_search_needs_three_letters_or_digits_in_a_row(admin_client, admin):
    await run_sync(create_tickets, admin, 2)
    for term in ("ab", "a b", "...", "%%%", "__", "a.b.c", " 12 "):
        r = await admin_client.get("/api/tickets/", params={"search": term})
        assert r.status_code == 400, term
        assert "at least 3 letters or digits in a row" in r.json()["search"][0], term
    for term in ("ticket", "KET 1", "x-123", "日本語", "(tic)"):
        r = await admin_client.get("/api/tickets/", params={"search": term})
        assert r.status_code == 200, (term, r.text)
    r = await admin_client.get("/api/tickets/", params={"search": "ket 1"})
    assert [t["title"] for t in r.json()["results"]] == ["ticket 1"]


# --- PUT / PATCH ----------------------------------------------------------------------------
@pytest.mark.smoke
async def test_patch_assigning_an_open_ticket_makes_it_assigned(admin_client, admin, agent):
    [ticket] = await run_sync(create_tickets, admin, 1)
    body = await _assign(admin_client, ticket.pk, agent.pk)
    assert body["status"] == "assigned"
    assert body["assigned_to"] == agent.pk
    assert body["assigned_at"] is not None
    assert await run_sync(_active_assignments, ticket.pk) == [agent.pk]


async def test_patch_edits_fields_and_bumps_updated_at(admin_client, admin):
    [ticket] = await run_sync(create_tickets, admin, 1)
    r = await admin_client.patch(
        f"/api/tickets/{ticket.pk}/", json={"title": "New", "priority": "high"}
    )
    body = r.json()
    assert (body["title"], body["priority"], body["description"]) == ("New", "high", "")
    assert body["updated_at"] > body["created_at"]


async def test_empty_patch_changes_nothing(admin_client, admin):
    [ticket] = await run_sync(create_tickets, admin, 1)
    before = (await admin_client.get(f"/api/tickets/{ticket.pk}/")).json()
    r = await admin_client.patch(f"/api/tickets/{ticket.pk}/", json={})
    assert r.status_code == 200
    assert r.json() == before


async def test_put_requires_every_writable_field(admin_client, admin):
    [ticket] = await run_sync(create_tickets, admin, 1)
    r = await admin_client.put(f"/api/tickets/{ticket.pk}/", json={"title": "only title"})
    assert r.status_code == 400
    assert {"description", "priority", "status", "assigned_to"} <= set(r.json())
    assert (await run_sync(_ticket, ticket.pk)).title == "ticket 0"


async def test_put_round_trips_a_get_representation(admin_client, admin, agent):
    [ticket] = await run_sync(create_tickets, admin, 1)
    body = await _assign(admin_client, ticket.pk, agent.pk)
    body["title"] = "Replaced"
    r = await admin_client.put(f"/api/tickets/{ticket.pk}/", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["title"] == "Replaced"
    assert r.json()["assigned_at"] == body["assigned_at"]  # same holder: assignment kept


async def test_assigned_to_must_be_an_active_agent(admin_client, admin, agent):
    [ticket] = await run_sync(create_tickets, admin, 1)
    not_agent = await run_sync(create_user)
    inactive = await run_sync(create_user, agent=True)
    await run_sync(lambda: type(inactive).objects.filter(pk=inactive.pk).update(is_active=False))
    for who in (not_agent.pk, inactive.pk, 999_999, admin.pk):
        r = await admin_client.patch(f"/api/tickets/{ticket.pk}/", json={"assigned_to": who})
        assert r.status_code == 400, who
        assert "assigned_to" in r.json()
    assert await run_sync(_active_assignments, ticket.pk) == []
    assert (await run_sync(_ticket, ticket.pk)).status == "open"


@pytest.mark.smoke
async def test_patch_status_open_returns_ticket_to_pool(admin_client, admin, agent):
    [ticket] = await run_sync(create_tickets, admin, 1)
    await _assign(admin_client, ticket.pk, agent.pk)
    r = await admin_client.patch(f"/api/tickets/{ticket.pk}/", json={"status": "open"})
    body = r.json()
    assert (body["status"], body["assigned_to"], body["assigned_at"]) == ("open", None, None)
    assert await run_sync(_active_assignments, ticket.pk) == []
    # the history row stays, inactive
    assert await TicketAssignment.objects.filter(ticket_id=ticket.pk).acount() == 1


async def test_patch_assigned_to_null_returns_ticket_to_open(admin_client, admin, agent):
    [ticket] = await run_sync(create_tickets, admin, 1)
    await _assign(admin_client, ticket.pk, agent.pk)
    await admin_client.patch(f"/api/tickets/{ticket.pk}/", json={"status": "resolved"})
    r = await admin_client.patch(f"/api/tickets/{ticket.pk}/", json={"assigned_to": None})
    assert (r.json()["status"], r.json()["assigned_to"]) == ("open", None)


async def test_reassign_moves_the_active_assignment(admin_client, admin, agent, other_agent):
    [ticket] = await run_sync(create_tickets, admin, 1)
    await _assign(admin_client, ticket.pk, agent.pk)
    body = await _assign(admin_client, ticket.pk, other_agent.pk)
    assert (body["status"], body["assigned_to"]) == ("assigned", other_agent.pk)
    assert await run_sync(_active_assignments, ticket.pk) == [other_agent.pk]


async def test_a_ticket_whose_holder_left_out_of_band_stays_editable_but_not_reassignable_to_it(
    admin_client, admin, agent, other_agent
):
    """An agent taken out of the agents group behind the service's back (a raw membership
    delete: no release) still holds an assigned ticket. Edits that give it nothing pass (the
    active-agent rule guards an agent that gains a ticket); giving it another ticket does not,
    and the ticket can go to someone else."""
    [held, other] = await run_sync(create_tickets, admin, 2)
    await _assign(admin_client, held.pk, agent.pk)
    await run_sync(lambda: agent.groups.clear())
    r = await admin_client.patch(f"/api/tickets/{held.pk}/", json={"title": "still mine"})
    assert r.status_code == 200, r.text
    assert (r.json()["title"], r.json()["assigned_to"]) == ("still mine", agent.pk)
    r = await admin_client.patch(f"/api/tickets/{other.pk}/", json={"assigned_to": agent.pk})
    assert r.status_code == 400
    assert "assigned_to" in r.json()
    body = await _assign(admin_client, held.pk, other_agent.pk)
    assert (body["status"], body["assigned_to"]) == ("assigned", other_agent.pk)


async def test_resolved_and_closed_keep_the_assignment(admin_client, admin, agent):
    [ticket] = await run_sync(create_tickets, admin, 1)
    await _assign(admin_client, ticket.pk, agent.pk)
    for status in ("resolved", "closed"):
        r = await admin_client.patch(f"/api/tickets/{ticket.pk}/", json={"status": status})
        assert (r.json()["status"], r.json()["assigned_to"]) == (status, agent.pk)
    # reopening to the same agent is allowed while it is under the cap
    r = await admin_client.patch(f"/api/tickets/{ticket.pk}/", json={"status": "assigned"})
    assert (r.json()["status"], r.json()["assigned_to"]) == ("assigned", agent.pk)


@pytest.mark.parametrize("status", ["assigned", "resolved", "closed"])
async def test_statuses_that_need_an_agent_refuse_an_unassigned_ticket(admin_client, admin, status):
    [ticket] = await run_sync(create_tickets, admin, 1)
    r = await admin_client.patch(f"/api/tickets/{ticket.pk}/", json={"status": status})
    assert r.status_code == 409
    assert "agent" in r.json()["detail"]
    assert (await run_sync(_ticket, ticket.pk)).status == "open"


async def test_open_with_an_agent_is_a_conflict(admin_client, admin, agent):
    [ticket] = await run_sync(create_tickets, admin, 1)
    r = await admin_client.patch(
        f"/api/tickets/{ticket.pk}/", json={"status": "open", "assigned_to": agent.pk}
    )
    assert r.status_code == 409
    assert await run_sync(_active_assignments, ticket.pk) == []


async def test_null_agent_with_a_working_status_is_a_conflict(admin_client, admin, agent):
    [ticket] = await run_sync(create_tickets, admin, 1)
    await _assign(admin_client, ticket.pk, agent.pk)
    r = await admin_client.patch(
        f"/api/tickets/{ticket.pk}/", json={"status": "resolved", "assigned_to": None}
    )
    assert r.status_code == 409
    assert await run_sync(_active_assignments, ticket.pk) == [agent.pk]


@override_settings(SUPPORT_AGENT_MAX_TICKETS=3)
async def test_admin_is_held_to_the_cap(admin_client, admin, agent):
    tickets = await run_sync(create_tickets, admin, 4)
    for ticket in tickets[:3]:
        await _assign(admin_client, ticket.pk, agent.pk)
    r = await admin_client.patch(f"/api/tickets/{tickets[3].pk}/", json={"assigned_to": agent.pk})
    assert r.status_code == 409
    assert "cap" in r.json()["detail"]
    assert await run_sync(_active_assignments, tickets[3].pk) == []
    # a resolved ticket no longer counts toward the cap
    await admin_client.patch(f"/api/tickets/{tickets[0].pk}/", json={"status": "resolved"})
    await _assign(admin_client, tickets[3].pk, agent.pk)
    # ... and reopening the resolved one would now exceed it
    r = await admin_client.patch(f"/api/tickets/{tickets[0].pk}/", json={"status": "assigned"})
    assert r.status_code == 409


@override_settings(SUPPORT_AGENT_MAX_TICKETS=1)
async def test_editing_a_held_ticket_at_the_cap_is_not_refused(admin_client, admin, agent):
    [ticket] = await run_sync(create_tickets, admin, 1)
    await _assign(admin_client, ticket.pk, agent.pk)
    r = await admin_client.patch(
        f"/api/tickets/{ticket.pk}/", json={"title": "still mine", "assigned_to": agent.pk}
    )
    assert r.status_code == 200


async def test_update_of_missing_ticket_is_404(admin_client):
    r = await admin_client.patch("/api/tickets/424242/", json={"title": "x"})
    assert r.status_code == 404


# --- delete ---------------------------------------------------------------------------------
@pytest.mark.smoke
async def test_delete_removes_ticket_and_its_assignments(admin_client, admin, agent):
    [ticket] = await run_sync(create_tickets, admin, 1)
    await _assign(admin_client, ticket.pk, agent.pk)
    r = await admin_client.delete(f"/api/tickets/{ticket.pk}/")
    assert r.status_code == 204
    assert r.content == b""
    assert not await Ticket.objects.filter(pk=ticket.pk).aexists()
    assert not await TicketAssignment.objects.filter(ticket_id=ticket.pk).aexists()
    assert (await admin_client.delete(f"/api/tickets/{ticket.pk}/")).status_code == 404
