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
  set some step left, at a moment the request was being served (``answer_was_held``);
- every write of a ticket row adds one to its version and writes one event (the creation
  writes version 1 and its event, a deletion only its event): a ticket's events in id order
  number its versions, so an answer's ETag ``"<id>.<version>"`` names the event that made it
  (``version_chain``, ``effect_problems``).

Idempotency-Key (support.api.idempotency) is checked from the recorded calls alone
(``key_problems``): per user and key, one request did the work and every other answer is that
answer replayed, a 409 "still running" while it ran, or a refusal of the checks.
"""

import asyncio
import json
import re
import time
from collections import Counter, defaultdict
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
    headers: dict | None = None  # the answer's, names in lower case
    key: str | None = None  # the Idempotency-Key sent
    if_match: str | None = None  # the If-Match sent
    content: bytes | None = None  # the answer's body as sent

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
    key: str | None = None,
    if_match: str | None = None,
    **kwargs,
) -> Call:
    """Send one request as ``user`` (by its token), with ``key`` as its Idempotency-Key and
    ``if_match`` as its If-Match when given; append its Call to ``calls``, return it.

    A transport error or timeout is recorded (status None), not raised."""
    headers = {"Authorization": f"Token {user.token}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    if if_match is not None:
        headers["If-Match"] = if_match
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
            call.content = r.content
    call.target = target
    call.key = key
    call.if_match = if_match
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


# --- Idempotency-Key and versions -------------------------------------------------------------
# The checks' refusals (token, role, throttle): the request never reached its key, so they are
# neither stored nor replayed (support.api.idempotency).
CHECK_REFUSALS = frozenset({401, 403, 429})
SLACK = 0.001  # the clocks' rounding, as in answer_was_held
_TAG = re.compile(r'"([0-9]+)\.([0-9]+)"')


def replayed(call: Call) -> bool:
    return (call.headers or {}).get("idempotent-replayed") == "true"


def key_in_use(call: Call) -> bool:
    """The 409 of a key whose first request is still running (it alone has Retry-After)."""
    return call.status == 409 and "retry-after" in (call.headers or {})


def key_problems(calls: list[Call]) -> list[str]:
    """Every way the recorded answers break the Idempotency-Key contract.

    Per user and key (the test sends one request under a key, maybe several times): exactly
    one send did the work, unless every send was refused by the checks; every replayed answer
    is that send's answer, status, body bytes and ETag; a 409 "still running" (Retry-After:
    1) was sent before that send had answered, and overlapped it; no 422 (a true repeat is no
    other request); a check refusal is never a replay. A send without a key is never a replay
    nor a 409 "still running"."""
    problems: list[str] = []
    by_key: dict[tuple[int, str], list[Call]] = defaultdict(list)
    for call in calls:
        if call.key is not None:
            by_key[(call.actor, call.key)].append(call)
        elif replayed(call) or key_in_use(call):
            problems.append(f"an unkeyed request was answered as a keyed one: {call}")
    for (actor, key), mine in by_key.items():
        where = f"key {key!r} of user {actor}"
        sent = {(c.method, c.path, json.dumps(c.body, sort_keys=True), c.if_match) for c in mine}
        if len(sent) != 1:
            problems.append(f"{where}: the test sent {len(sent)} different requests under it")
        for call in mine:
            if call.status == 422:
                problems.append(f"{where}: a true repeat was called another request: {call}")
            if call.status in CHECK_REFUSALS and replayed(call):
                problems.append(f"{where}: a refusal of the checks was replayed: {call}")
        ran = [
            c
            for c in mine
            if c.status not in CHECK_REFUSALS and not key_in_use(c) and not replayed(c)
        ]
        if len(ran) != 1:
            if ran or any(replayed(c) or key_in_use(c) for c in mine):
                problems.append(f"{where}: {len(ran)} sends did the work, not 1: {mine}")
            continue
        [first] = ran
        answer = (first.status, first.content, first.headers.get("etag"))
        for call in mine:
            if replayed(call):
                if (call.status, call.content, call.headers.get("etag")) != answer:
                    problems.append(f"{where}: replayed {call} for the first answer {first}")
                if call.end < first.start:
                    problems.append(f"{where}: replayed before its first send: {call}")
            elif key_in_use(call):
                if call.headers["retry-after"] != "1":
                    problems.append(f"{where}: 409 with Retry-After {call.headers['retry-after']}")
                if not (call.start < first.end and call.end > first.start):
                    problems.append(
                        f"{where}: 409 'still running' outside the first send "
                        f"[{first.start:.3f}, {first.end:.3f}]: {call}"
                    )
    return problems


def version_chain(events: list[dict]) -> tuple[dict[tuple[int, int], dict], dict[int, int | None]]:
    """Each ticket's versions from its events in id order: ``(ticket, version)`` -> the event
    that made that version, and each ticket's last version (None once deleted). A ticket made
    in bulk (no ``created`` event) starts at version 1."""
    made: dict[tuple[int, int], dict] = {}
    last: dict[int, int | None] = {}
    for event in events:
        ticket = event["ticket_id"]
        if event["kind"] == "deleted":
            last[ticket] = None
            continue
        version = 1 if event["kind"] == "created" else (last.get(ticket) or 1) + 1
        made[(ticket, version)] = event
        last[ticket] = version
    return made, last


def version_problems(events: list[dict], versions: dict[int, int]) -> list[str]:
    """The tickets' versions in the database (``versions``: id -> version) against their
    events: a write without its event, or an event without its write, shows up here."""
    _, last = version_chain(events)
    problems = [
        f"ticket {ticket} is at version {version}, its events make {last.get(ticket, 1)}"
        for ticket, version in versions.items()
        if last.get(ticket, 1) != version
    ]
    problems += [
        f"ticket {ticket} is gone without its deleted event"
        for ticket, version in last.items()
        if version is not None and ticket not in versions
    ]
    return problems


def _tag(value: str | None) -> tuple[int, int] | None:
    found = _TAG.fullmatch(value or "")
    return (int(found[1]), int(found[2])) if found else None


def _ticket_of(call: Call) -> int:
    if call.kind == "move":
        return call.body["ticket_id"]
    return int(call.path.rstrip("/").rsplit("/", 1)[1])  # /api/tickets/<id>/


def effect_problems(calls: list[Call], events: list[dict], admin_id: int) -> list[str]:
    """The answered writes against the events that made them, by the ETag's version.

    Calls by kind: ``create`` (POST /api/tickets/), ``move`` (an agent's POST
    /api/agent/tickets/), ``patch`` and ``delete`` (/api/tickets/<id>/), ``deactivate``
    (DELETE /api/agents/<id>/); the admin ``admin_id`` makes the admin's calls.

    - a 201 create and a 200 move (not replayed) name, in their ETag, their answer's ticket
      and version; the event that made that version is theirs: the creation with their title,
      the agent's move to their status, stamped while they ran;
    - a 200 edit names a version some event made before it answered;
    - a 412 carries the ticket's ETag, a version newer than its If-Match, one the ticket had
      before the answer;
    - every creation, deletion and agent's move was made by exactly one answered request (a
      replay, a refusal or a 412 made none), and every other event of the admin by an
      answered edit or deactivation running at that moment.
    """
    made, _ = version_chain(events)
    deletions = {e["ticket_id"]: e for e in events if e["kind"] == "deleted"}
    problems: list[str] = []
    claims: Counter = Counter()  # event id -> the answered requests that made it
    edited: set[int] = set()  # the admin's events an answered edit or deactivation may have made

    def during(event: dict, call: Call) -> bool:
        return call.start - SLACK <= event["at"] <= call.end + SLACK

    for call in calls:
        if call.status is None or replayed(call):
            continue
        where = f"{call.kind} {call.method} {call.path} {call.body} -> {call.status}"
        tag = _tag((call.headers or {}).get("etag"))
        if call.status == 412:
            sent = _tag(call.if_match)
            if tag is None or tag[0] != _ticket_of(call):
                problems.append(f"{where}: 412 without the ticket's ETag: {call.headers}")
            elif sent is None or tag[1] <= sent[1]:
                problems.append(f"{where}: 412 names {tag}, not newer than If-Match {sent}")
            elif tag[1] > 1 and (tag not in made or made[tag]["at"] > call.end + SLACK):
                problems.append(f"{where}: 412 names {tag}, a version the ticket had not yet")
        elif call.kind in ("create", "move", "patch") and call.status in (200, 201):
            if tag is None or tag != (call.json["id"], call.json["version"]):
                problems.append(f"{where}: ETag {call.headers.get('etag')} is not its answer's")
                continue
            event = made.get(tag)
            if call.kind == "patch":
                if event is None and tag[1] != 1:
                    problems.append(f"{where}: answers {tag}, a version no event made")
                elif event is not None and event["at"] > call.end + SLACK:
                    problems.append(f"{where}: answers {tag}, made after it answered: {event}")
                elif event is not None and event["actor"] == admin_id and during(event, call):
                    edited.add(event["id"])
                continue
            if call.kind == "create":
                want = ("created", admin_id, "open", [None, call.body["title"]])
            else:
                want = ("status_changed", call.actor, call.body["status"], None)
            if (
                event is None
                or (event["kind"], event["actor"], event["to_status"]) != want[:3]
                or not during(event, call)
                or (want[3] is not None and event["changes"]["title"] != want[3])
            ):
                problems.append(f"{where}: its version {tag} was made by {event}")
                continue
            claims[event["id"]] += 1
        elif call.kind == "delete" and call.status == 204:
            event = deletions.get(_ticket_of(call))
            if event is None or event["actor"] != admin_id or not during(event, call):
                problems.append(f"{where}: its deletion is {event}")
                continue
            claims[event["id"]] += 1
        elif call.kind == "deactivate" and call.status == 204:
            edited.update(
                e["id"]
                for e in events
                if e["kind"] == "released"
                and (e["actor"], e["agent"]) == (admin_id, call.target)
                and during(e, call)
            )
    for event in events:
        kind, actor = event["kind"], event["actor"]
        where = f"event {event['id']} ({kind} by {actor}) of ticket {event['ticket_id']}"
        if kind in ("created", "deleted") or (kind == "status_changed" and actor != admin_id):
            if claims[event["id"]] != 1:
                problems.append(f"{where}: made by {claims[event['id']]} answered requests")
        elif actor == admin_id and event["id"] not in edited:
            problems.append(f"{where}: no answered edit or deactivation made it")
    return problems
