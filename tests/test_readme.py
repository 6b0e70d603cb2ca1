"""The README's curl examples, run as printed against the quick start.

The blocks after each ``<!-- readme-example: curl -->`` are taken from README.md as they are,
and run in their order as one script (a later section's block continues the session of the
first: its variables and functions), then the one after ``<!-- readme-example: events -->``
(*Live events*), in the same shell. The quick
start is set up as scripts/dev.sh does it (debug on, a fresh SQLite file, ``migrate``,
``seed_demo``), served by uvicorn on a free port; only the passwords seed_demo printed and the
port (``localhost:8000``) are put in. bash runs the block with ``set -euo pipefail``, so a
refused call (``--fail-with-body``) or a missing value stops it; a ``curl`` function in front
of the block records each call's status on stderr and puts each answer on its own line.
"""

import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from tests.servers import ROOT, run_uvicorn

MARKER = "<!-- readme-example: curl -->"
PLACEHOLDERS = {"admin": "'<admin password>'", "alice": "'<alice password>'"}
# Records "HTTP <status> <method> <url>" on stderr; the answer ends with a newline.
CURL_RECORDER = (
    "curl() { command curl --write-out "
    "'\\n%{stderr}HTTP %{http_code} %{method} %{url_effective}\\n' \"$@\"; }"
)
# The calls the example makes, in order, with the status each must answer.
EXPECTED_CALLS = [
    ("POST", "/api/auth/token/", 200),
    ("POST", "/api/auth/token/", 200),
    ("GET", "/api/agent/tickets/", 200),
    ("GET", "/api/agent/tickets/", 200),  # ?wait=5
    ("POST", "/api/agent/tickets/", 200),
    ("GET", "/api/agents/", 200),
    ("POST", "/api/tickets/", 201),
    ("GET", "/api/tickets/", 200),
    ("GET", "/api/tickets/", 200),
    ("PATCH", "/api/tickets/{id}/", 200),
    ("GET", "/api/tickets/{id}/history/", 200),
    ("DELETE", "/api/tickets/{id}/", 204),
    ("POST", "/api/agents/", 201),
    ("DELETE", "/api/agents/{id}/", 204),
    ("POST", "/api/agent/tickets/{id}/release/", 200),  # *Idle release and hand-back*
    ("POST", "/api/tickets/", 201),  # *Safe retries and concurrent edits*: keyed
    ("POST", "/api/tickets/", 201),  # ... and its retry, replayed
    ("GET", "/api/tickets/{id}/", 200),  # the ETag
    ("PATCH", "/api/tickets/{id}/", 200),  # If-Match: current
    ("PATCH", "/api/tickets/{id}/", 412),  # If-Match: stale
]


# *Live events*: run after the blocks above, in the same shell (its tokens and json_get).
EVENTS_MARKER = "<!-- readme-example: events -->"
EVENTS_CALLS = [
    ("POST", "/api/tickets/", 201),  # in the background, while the stream runs
    ("GET", "/api/events/", 200),  # the stream, ended by --max-time
    ("GET", "/api/events/", 200),
    ("GET", "/api/events/", 200),
]


def readme_block(marker: str = MARKER) -> str:
    """Every block after ``marker``, in the README's order, as one script."""
    parts = (ROOT / "README.md").read_text().split(marker)[1:]
    assert parts, f"README.md has no {marker}"
    blocks = []
    for part in parts:
        match = re.match(r"\s*```sh\n(.*?)\n```\n", part, re.DOTALL)
        assert match, f"no ```sh block right after a {marker}"
        blocks.append(match[1])
    return "\n".join(blocks)


def dev_env(database: Path) -> dict[str, str | None]:
    """scripts/dev.sh's environment: debug on, SQLite, defaults for the rest (None: unset
    what the test session or run_uvicorn would set)."""
    unset = (
        "DJANGO_SECRET_KEY",
        "DJANGO_ALLOWED_HOSTS",
        "DJANGO_SECURE_SSL_REDIRECT",
        "DB_POOL_MIN_SIZE",
        "DB_POOL_MAX_SIZE",
        "DB_POOL_TIMEOUT",
    )
    return {
        **dict.fromkeys(unset),
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DJANGO_DEBUG": "1",
        "DATABASE_URL": f"sqlite:///{database}",
    }


def manage(*args: str, env: dict[str, str | None]) -> str:
    full_env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def passwords_from(seed_output: str) -> dict[str, str]:
    """{username: password} from seed_demo's table (role, username, password, token)."""
    lines = seed_output.splitlines()
    header = next(
        i for i, line in enumerate(lines) if line.split()[:3] == ["role", "username", "password"]
    )
    return {line.split()[1]: line.split()[2] for line in lines[header + 1 :] if line.strip()}


def json_lines(text: str) -> list:
    found = []
    for line in text.splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def event_kinds(db: sqlite3.Connection, ticket_id: int) -> list[str]:
    rows = db.execute(
        "SELECT kind FROM support_ticketevent WHERE ticket_id = ? ORDER BY id", (ticket_id,)
    )
    return [kind for (kind,) in rows]


def test_the_readme_curl_examples_work_as_printed_on_the_quick_start(tmp_path):
    block = readme_block() + "\n" + readme_block(EVENTS_MARKER)
    assert "localhost:8000" in block
    assert "--write-out" not in block
    assert not re.search(r"(^|\s)-w\s", block)

    database = tmp_path / "db.sqlite3"
    env = dev_env(database)
    manage("migrate", "--noinput", env=env)
    passwords = passwords_from(manage("seed_demo", env=env))

    script = block
    for user, placeholder in PLACEHOLDERS.items():
        assert script.count(placeholder) == 1, placeholder
        script = script.replace(placeholder, shlex.quote(passwords[user]))

    with run_uvicorn(workers=1, env=env) as server:
        script = script.replace("localhost:8000", f"localhost:{server.port}")
        done = subprocess.run(
            ["bash", "-c", "\n".join(["set -euo pipefail", CURL_RECORDER, script])],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
    report = f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.returncode == 0, report

    calls, timeouts = [], 0
    for line in done.stderr.splitlines():
        if line.startswith("curl: (28) Operation timed out after 5"):  # the stream's end
            timeouts += 1
            continue
        match = re.fullmatch(r"HTTP (\d{3}) (\w+) (\S+)", line)
        assert match, f"unexpected output on stderr: {line!r}\n{report}"
        path = re.sub(r"/\d+/", "/{id}/", urlsplit(match[3]).path)
        calls.append((match[2], path, int(match[1])))
    assert calls == EXPECTED_CALLS + EVENTS_CALLS, report
    assert timeouts == 1, report

    db = sqlite3.connect(database)
    try:
        users = dict(db.execute("SELECT username, id FROM auth_user"))
        answers = json_lines(done.stdout)
        # alice's fetch: 15 tickets, all hers
        fetched = next(a for a in answers if isinstance(a, list) and a and "status" in a[0])
        assert len(fetched) == 15, report
        assert {t["assigned_to"] for t in fetched} == {users["alice"]}
        # ... and the move of one of them answered 200 with the ticket resolved
        moved = [a for a in answers if isinstance(a, dict) and a.get("status") == "resolved"]
        assert len(moved) == 1, report
        assert moved[0]["id"] in {t["id"] for t in fetched}
        assert moved[0]["assigned_to"] == users["alice"]
        assert event_kinds(db, moved[0]["id"]) == ["created", "assigned", "status_changed"]
        # the admin's ticket: created (201), given to carol, its history shown, deleted
        patched = next(
            a for a in answers if isinstance(a, dict) and a.get("title") == "VPN drops every hour"
        )
        assert (patched["status"], patched["assigned_to"]) == ("assigned", users["carol"])
        # the search, by cursor, found it (its first page: nothing newer)
        lists = [a for a in answers if isinstance(a, dict) and "count_exact" in a]
        assert len(lists) == 2, report
        found = lists[1]
        assert [t["title"] for t in found["results"]] == ["VPN drops every hour"], report
        assert (found["count"], found["next"], found["previous"]) == (1, None, None)
        history = next(a for a in answers if isinstance(a, list) and a and "kind" in a[0])
        assert [e["kind"] for e in history] == ["created", "assigned"]
        assert event_kinds(db, patched["id"]) == ["created", "assigned", "deleted"]
        assert not db.execute(
            "SELECT 1 FROM support_ticket WHERE id = ?", (patched["id"],)
        ).fetchall()
        # alice handed her second ticket back: in the pool, with its release
        handed = [a for a in answers if isinstance(a, dict) and a.get("id") == fetched[1]["id"]]
        assert [(a["status"], a["assigned_to"]) for a in handed] == [("open", None)], report
        assert event_kinds(db, fetched[1]["id"]) == ["created", "assigned", "released"]
        assert db.execute(
            "SELECT status, assigned_to_id FROM support_ticket WHERE id = ?", (fetched[1]["id"],)
        ).fetchall() == [("open", None)]
        # safe retries: one printer ticket, its retry replayed; one edit, the stale one 412
        [(printer, priority, version)] = db.execute(
            "SELECT id, priority, version FROM support_ticket "
            "WHERE title = 'Printer jams on tray 2'"
        ).fetchall()
        assert (priority, version) == (3, 2), report  # urgent, edited once
        assert event_kinds(db, printer) == ["created", "edited"]
        assert len(re.findall(r"^idempotent-replayed: true\r?$", done.stdout, re.M | re.I)) == 1
        assert re.search(rf'^etag: "{printer}\.2"\r?$', done.stdout, re.M | re.I), report
        # the new agent, deactivated
        assert db.execute("SELECT is_active FROM auth_user WHERE username = 'dana'").fetchall() == [
            (0,)
        ]
        # Live events: the stream showed the ticket filed while it ran, as an SSE message
        [filed] = db.execute("SELECT id FROM support_ticket WHERE title = 'Printer on fire'")
        [(event_id,)] = db.execute(
            "SELECT id FROM support_ticketevent WHERE ticket_id = ? AND kind = 'created'", filed
        )
        streamed = re.search(rf"^id: {event_id}\nevent: created\ndata: (.*)$", done.stdout, re.M)
        assert streamed, report
        assert json.loads(streamed[1])["changes"]["title"] == [None, "Printer on fire"]
        # ... and alice's events as two JSON pages of 5, in order, each hers
        pages = [a for a in answers if isinstance(a, dict) and "next_after" in a]
        assert [len(p["events"]) for p in pages] == [5, 5], report
        ids = [e["id"] for p in pages for e in p["events"]]
        assert ids == sorted(ids)
        assert pages[1]["events"][0]["id"] > pages[0]["next_after"]
        assert {e["agent"] for p in pages for e in p["events"]} == {users["alice"]}
    finally:
        db.close()
