"""Recorded requests against a real server, and a checker that holds them against the
TicketEvent history in the database.

Why the event history can be trusted as a timeline (support/services/locks.py, the lock contract):

- every change of a ticket holds the ticket's row lock, so one ticket's events in id order are
  in commit order: replaying them must give a consistent chain (each event's "from" side is
  the state the previous one left);
- every change that adds a ticket to, or takes one from, an agent's held set holds that agent's
  row lock for the whole transaction, and stamps its events' ``at`` after taking that lock and
  before committing. So the transactions touching one agent follow each other in id order, and
  give the agent's held set (its tickets in status ``assigned``) after each of them: the cap can
  be checked at every moment, not just at the end;
- an agent's fetch reads its held set under the same lock, so its answer must equal the held
  set some step left, at a moment the request was being served (``answer_was_held``).
"""

import asyncio
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import httpx
from django.db import connection

GONE = ("deleted", None)
BORN = ("open", None)  # every ticket starts in the pool (test tickets made in bulk have no event)


@dataclass
class Call:
    """One request and its answer. Times are time.time(): the clock of the server's
    timezone.now() on this machine."""

    actor: int  # the user id making the call
    kind: str
    method: str
    path: str
    body: dict | None
    start: float
    end: float
    status: int | None  # None: no HTTP answer (``error`` says why)
    json: Any = None
    error: str | None = None
    target: int | None = None  # e.g. the agent a PATCH assigns, or the agent deactivated
    headers: dict | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200


async def record(
    client: httpx.AsyncClient,
    calls: list[Call],
    user,
    kind: str,
    method: str,
    path: str,
    body: dict | None = None,
    *,
    gate: asyncio.Semaphore | None = None,
    target: int | None = None,
    **kwargs,
) -> Call:
    """Send one request as ``user`` (by its token), append its Call to ``calls``, return it.

    A transport error or timeout is recorded (status None), not raised."""
    headers = {"Authorization": f"Token {user.token}"}
    if gate is None:
        gate = asyncio.Semaphore(1)
    async with gate:
        start = time.time()
        try:
            r = await client.request(method, path, json=body, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            call = Call(
                user.pk, kind, method, path, body, start, time.time(), None, None, repr(exc)
            )
        else:
            end = time.time()
            try:
                payload = r.json() if r.content else None
            except ValueError:
                payload = r.text[:500]
            call = Call(user.pk, kind, method, path, body, start, end, r.status_code, payload)
            call.headers = dict(r.headers)
    call.target = target
    calls.append(call)
    return call


@dataclass
class Step:
    """One transaction that touched an agent's tickets, and the agent's held set after it."""

    xid: str | None
    at_min: float
    at_max: float
    held: frozenset


def load_events() -> list[dict]:
    """Every TicketEvent in id order, with its transaction id (xmin)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, ticket_id, at, kind, from_status, to_status, actor_id, agent_id, changes,"
            " xmin::text FROM support_ticketevent ORDER BY id"
        )
        columns = ["id", "ticket_id", "at", "kind", "from_status", "to_status", "actor", "agent"]
        events = []
        for row in cursor.fetchall():
            event = dict(zip(columns, row[:-2], strict=True))
            changes = row[-2]
            event["changes"] = json.loads(changes) if isinstance(changes, str) else changes
            event["xid"] = row[-1]
            event["at"] = event["at"].timestamp()
            events.append(event)
    return events


def replay(events: list[dict]) -> tuple[dict, dict[int, list[Step]], list[str]]:
    """Replay every ticket's events in id order.

    Returns each ticket's (status, holder) at the end, each agent's steps (the first one the
    empty set before anything happened), and every inconsistency met: an event whose "from"
    side is not the replayed state (a lost or extra event, or a ticket given to a second agent
    while the first still held it), or transactions of one agent that interleave."""
    state: dict[int, tuple] = {}
    steps: dict[int, list[Step]] = defaultdict(
        lambda: [Step(None, float("-inf"), float("-inf"), frozenset())]
    )
    problems: list[str] = []
    for event in events:
        ticket, changes = event["ticket_id"], event["changes"]
        before = state.get(ticket, BORN)
        where = f"event {event['id']} ({event['kind']}) of ticket {ticket}"
        if event["kind"] == "created":
            if ticket in state:
                problems.append(f"{where}: created twice")
            state[ticket] = BORN
            continue
        if before == GONE:
            problems.append(f"{where}: after its deletion")
            continue
        if event["from_status"] != before[0]:
            problems.append(f"{where}: from_status {event['from_status']}, replay says {before}")
        if "status" in changes and changes["status"][0] != before[0]:
            problems.append(f"{where}: status was {changes['status'][0]}, replay says {before}")
        if "assigned_to" in changes and changes["assigned_to"][0] != before[1]:
            problems.append(
                f"{where}: taken from {changes['assigned_to'][0]} while {before[1]} held it"
            )
        if event["kind"] == "deleted":
            after = GONE
        else:
            after = (
                changes.get("status", [None, before[0]])[1],
                changes.get("assigned_to", [None, before[1]])[1],
            )
            if event["to_status"] != after[0]:
                problems.append(f"{where}: to_status {event['to_status']}, replay says {after}")
            if (after[0] == "open") != (after[1] is None):
                problems.append(f"{where}: leaves the ticket {after[0]} with holder {after[1]}")
        state[ticket] = after
        for agent in {before[1], after[1]} - {None}:
            mine = steps[agent]
            last = mine[-1]
            held = set(last.held)
            if before == ("assigned", agent):
                if ticket not in held:
                    problems.append(f"{where}: agent {agent} gives up a ticket it did not hold")
                held.discard(ticket)
            if after == ("assigned", agent):
                held.add(ticket)
            if last.xid == event["xid"]:
                at_max = max(last.at_max, event["at"])
                mine[-1] = Step(last.xid, last.at_min, at_max, frozenset(held))
                continue
            if any(step.xid == event["xid"] for step in mine):
                problems.append(f"{where}: transactions interleaved on agent {agent}")
            mine.append(Step(event["xid"], event["at"], event["at"], frozenset(held)))
    return state, steps, problems


def answer_was_held(call: Call, steps: list[Step]) -> bool:
    """Was the answer of a 200 fetch the agent's held set at some moment it was served?

    Step k's set holds from its commit until step k+1's commit. Step k stamped ``at`` after
    taking the agent's lock and before committing; step k+1 took the lock only after the
    fetch's own transaction (which read the set under that lock, at a moment T) had ended.
    So with state k read at T in [start, end]: at(k) < T <= end and at(k+1) > T >= start.
    (A millisecond of slack for the clocks' rounding only widens the window.)
    """
    answer = frozenset(t["id"] for t in call.json)
    for k, step in enumerate(steps):
        if step.held != answer or step.at_max > call.end + 0.001:
            continue
        if k + 1 == len(steps) or steps[k + 1].at_min > call.start - 0.001:
            return True
    return False


def history_problems(
    calls: list[Call], cap: int, events: list[dict] | None = None
) -> tuple[list[str], dict[int, list[Step]]]:
    """Everything the event history and the recorded fetch answers disagree on: the replay's
    inconsistencies, an agent above ``cap`` after any transaction, a fetch answer that was not
    the agent's held set while it ran. Returns the problems and the agents' steps."""
    _, steps, problems = replay(load_events() if events is None else events)
    for agent, mine in steps.items():
        most = max(len(step.held) for step in mine)
        if most > cap:
            problems.append(f"agent {agent} held {most} tickets in status assigned (cap {cap})")
    for call in calls:
        if call.kind != "fetch" or call.status != 200:
            continue
        mine = (call.actor, "assigned")
        wrong = [t["id"] for t in call.json if (t["assigned_to"], t["status"]) != mine]
        if wrong:
            problems.append(f"fetch by {call.actor} listed tickets not assigned to it: {wrong}")
        if not answer_was_held(call, steps[call.actor]):
            problems.append(f"fetch by {call.actor} answered a set it did not hold: {call}")
    return problems, steps
