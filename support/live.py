"""Wait for work: each worker process's listening connection, and its agents waiting for tickets.

An agent that asks ``GET /api/agent/tickets/?wait=N`` and holds nothing after its top-up waits
here, on the event loop, holding no thread and no database connection. Tickets entering the
pool (a creation, a release, a reopening) make PostgreSQL send
``NOTIFY support_pool, '<how many> <when>'`` at commit (migration 0011). Each worker process
keeps one connection listening for it, straight to PostgreSQL (``SUPPORT_LISTEN_DATABASE_URL``:
LISTEN needs a session, which a transaction pooler does not give), and wakes enough of its
waiters to take that many tickets, longest waiter first. A woken waiter makes the same locked
top-up as any fetch; one that finds the tickets already taken (by a waiter of another process)
waits again, in its place.

Fairness: within a process, the longest waiter is served first. Across processes there is no
global queue: every process wakes its own longest waiters and the database gives each ticket
to whichever top-up takes it first (``SKIP LOCKED``). No ticket goes to two agents, and every
waiter is woken for every ticket while it waits, but a waiter of one process may be served
before an older waiter of another.

While waiters sleep, the listening connection also looks at the pool every
``SUPPORT_WAIT_POLL_SECONDS`` (one statement on that connection): a wake may be spent without
the ticket being taken (it was locked by someone else just then) and no later notification
come; the look wakes waiters for what is still there.

If the listening connection is lost, the process tries to reopen it every
``SUPPORT_WAIT_POLL_SECONDS`` and meanwhile looks at the pool itself at that interval (the
open count, through the app's own database path) and wakes waiters for what it finds. When the
connection is back it looks once more, for what it missed. On SQLite there is no listening:
waiters are always served by that polling.
"""

import asyncio
import logging
import math
import random
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import dj_database_url
import psycopg
from django.conf import settings
from django.db import close_old_connections, connections

from support import observability as obs
from support import rules
from support.rules import Status

log = logging.getLogger("support.live")

CHANNEL = "support_pool"
KEEPALIVE = 30.0  # seconds of silence after which the listening connection is checked
# A generator of its own, seeded from the system: the process-wide one is left to the program
# that seeds it (tests, Hypothesis), and this module's draws from another thread never move it.
_jitter = random.Random()  # noqa: S311 (timing jitter, not a secret)
APPLICATION_NAME = "support-listener"


_NOT_LIBPQ = {
    "pool",
    "options",  # the app's own session settings (timeouts): a direct session sets its own
    "application_name",
    "connect_timeout",
    "prepare_threshold",
    "server_side_binding",
    "cursor_factory",
    "isolation_level",
    "assume_role",
}


def conninfo(application_name: str) -> dict:
    """Connection parameters for a session straight to PostgreSQL: SUPPORT_LISTEN_DATABASE_URL,
    or the app's own database (as the app connects to it: in tests, the test database)."""
    url = settings.SUPPORT_LISTEN_DATABASE_URL
    db = dj_database_url.parse(url) if url else connections["default"].settings_dict
    # libpq's own options (sslmode, sslrootcert...) as given; not the pool's or Django's
    params = {
        key: value for key, value in (db.get("OPTIONS") or {}).items() if key not in _NOT_LIBPQ
    }
    params |= {
        "dbname": db["NAME"],
        "user": db.get("USER") or None,
        "password": db.get("PASSWORD") or None,
        "host": db.get("HOST") or None,
        "port": db.get("PORT") or None,
        "connect_timeout": settings.DB_CONNECT_TIMEOUT,
        "application_name": application_name,
        # a host that vanishes without closing the connection is noticed in about a minute
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
    }
    return {key: value for key, value in params.items() if value is not None}


class Waiter:
    """One request waiting for work, from its arrival to its answer. ``woken``: tickets may
    be there for it; set while it looks at the pool, it looks again at once."""

    __slots__ = ("asleep", "woken")

    def __init__(self):
        self.woken = asyncio.Event()
        self.asleep = False  # waiting (else looking at the pool)


class Pool:
    """The agents of this process waiting for tickets, longest first, and what wakes them."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: list[Waiter] = []  # by arrival: joined before their first look
        self.listening = False
        self._task: asyncio.Task | None = None
        self._thread: ThreadPoolExecutor | None = None  # for the fallback's pool looks
        self._warned = -math.inf
        self.stopping = False
        on_stop(self._stopping)

    # --- the waiters' side (on the loop) ------------------------------------------------------
    def join(self) -> Waiter:
        """A request that may wait, before its first look at the pool: tickets that enter
        while it looks are not missed, and its place is its arrival."""
        self.start()
        waiter = Waiter()
        self.queue.append(waiter)
        return waiter

    def leave(self, waiter: Waiter) -> None:
        """The request is answered (or gone): a wake it did not use goes to the next one."""
        self.queue.remove(waiter)
        if waiter.woken.is_set():
            self.wake(1)

    async def wait(self, waiter: Waiter, deadline: float) -> bool:
        """Wait until tickets may be there for ``waiter`` (True) or ``deadline`` (False, on
        the event loop's clock; also once the worker is stopping). Holds nothing but the
        waiter's place."""
        if self.stopping or self.loop.time() >= deadline:
            return False
        if not waiter.woken.is_set():
            waiter.asleep = True
            obs.WAITING_AGENTS.inc()
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter.woken.wait()
            except TimeoutError:
                if not waiter.woken.is_set():
                    return False
            finally:
                waiter.asleep = False
                obs.WAITING_AGENTS.dec()
        waiter.woken.clear()
        return not self.stopping

    def _stopping(self) -> None:
        """The worker was told to stop: every waiter answers now (what it holds, nothing)
        instead of holding the server's graceful shutdown; clients ask again elsewhere."""
        self.stopping = True
        for waiter in self.queue:
            waiter.woken.set()

    @property
    def waiting(self) -> list[Waiter]:
        return [waiter for waiter in self.queue if waiter.asleep]

    def wake(self, tickets: int) -> None:
        """``tickets`` entered the pool: wake as many of the longest waiters as can take them
        (each holds nothing, so takes up to the cap). A waiter looking at the pool right now
        counts: it looks again at once, before any younger waiter."""
        count = math.ceil(tickets / rules.cap())
        for waiter in self.queue:
            if count <= 0:
                break
            if not waiter.woken.is_set():
                waiter.woken.set()
                count -= 1

    # --- the listening connection -------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = self.loop.create_task(self._run(), name="support-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._thread is not None:
            self._thread.shutdown(wait=False)
            self._thread = None

    async def _run(self) -> None:
        while True:
            if connections["default"].vendor == "postgresql":
                try:
                    await self._listen()
                except Exception as exc:  # whatever it was, waiters are served by polling
                    now = self.loop.time()
                    if self.listening or now - self._warned > 60:  # once a minute while down
                        self._warned = now
                        what = "lost" if self.listening else "could not open"
                        expected = isinstance(exc, psycopg.Error | OSError | TimeoutError)
                        log.warning(
                            "listening connection %s: %s; polling the pool",
                            what,
                            exc,
                            exc_info=not expected,
                        )
                finally:
                    self._listening(False)
            # Down (or SQLite): look at the pool while anyone waits, then try again.
            interval = settings.SUPPORT_WAIT_POLL_SECONDS
            await asyncio.sleep(interval * _jitter.uniform(0.8, 1.2))
            if self.queue:
                await self._look_through_app()

    async def _listen(self) -> None:
        async with await psycopg.AsyncConnection.connect(
            **conninfo(APPLICATION_NAME), autocommit=True
        ) as conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            self._listening(True)
            log.info("listening for tickets entering the pool")
            # What entered while nobody listened (the first start included).
            await self._found(await _open_count(conn))
            checked = self.loop.time()
            while True:
                # Every interval, whoever waits: a waiter that falls asleep during a spell
                # must not wait for the spell's end (it used to be KEEPALIVE long when nobody
                # slept at its start, and a wake spent on a locked ticket went unanswered).
                async for notify in conn.notifies(timeout=settings.SUPPORT_WAIT_POLL_SECONDS):
                    self.wake(int(notify.payload.split()[0]))
                # A quiet spell. With waiters asleep, a look at the pool: a wake can be spent
                # without a ticket taken (a ticket locked by someone else just then, an agent
                # waiting twice) and no later notification may come. The look also checks
                # that the connection is still there, as one does every KEEPALIVE without.
                if not self.waiting and self.loop.time() - checked < KEEPALIVE:
                    continue
                async with asyncio.timeout(settings.DB_CONNECT_TIMEOUT):
                    found = await _open_count(conn)
                checked = self.loop.time()
                if self.waiting:
                    await self._found(found)

    def _listening(self, up: bool) -> None:
        self.listening = up
        obs.POOL_LISTENING.set(int(up))

    async def _found(self, open_tickets: int) -> None:
        if open_tickets > 0:
            self.wake(open_tickets)

    async def _look_through_app(self) -> None:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="support-pool-look")
        try:
            found = await self.loop.run_in_executor(self._thread, _open_count_through_app)
        except Exception as exc:  # the database itself is down: the next look will tell
            log.warning("could not look at the pool: %s", exc)
            return
        await self._found(found)


async def _open_count(conn: psycopg.AsyncConnection) -> int:
    cursor = await conn.execute("SELECT COALESCE(SUM(open), 0)::bigint FROM support_ticket_count")
    return (await cursor.fetchone())[0]


def _open_count_through_app() -> int:
    from support.services.selectors import status_count

    try:
        return status_count([Status.OPEN])
    finally:
        close_old_connections()
        connections["default"].close()


_on_stop: dict[asyncio.AbstractEventLoop, list] = {}  # by event loop: what to call
_signals_chained = False


def on_stop(callback):
    """Call ``callback`` on the event loop when this process is told to stop (SIGTERM or
    SIGINT, before uvicorn's own handler starts its graceful shutdown, which waits for open
    requests): long waits and streams end at once rather than being cut off after it.
    Returns a function that takes the callback back."""
    global _signals_chained
    loop = asyncio.get_running_loop()
    for old in [old for old in _on_stop if old.is_closed()]:
        del _on_stop[old]
    callbacks = _on_stop.setdefault(loop, [])
    callbacks.append(callback)
    if not _signals_chained and threading.current_thread() is threading.main_thread():
        _signals_chained = True
        _chain_signals()
    return lambda: callback in callbacks and callbacks.remove(callback)


def _chain_signals() -> None:
    """One handler per process, in front of the one in place (uvicorn's, once it serves)."""

    def stopping(callbacks):
        for callback in list(callbacks):
            callback()

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):  # not serving (default or ignored): leave it alone
            continue

        def handler(signum, frame, previous=previous):
            for loop, callbacks in list(_on_stop.items()):
                if not loop.is_closed():
                    loop.call_soon_threadsafe(stopping, callbacks)
            previous(signum, frame)

        signal.signal(sig, handler)


_pools: dict[asyncio.AbstractEventLoop, Pool] = {}


def pool() -> Pool:
    """This process's (this event loop's) waiting agents."""
    loop = asyncio.get_running_loop()
    current = _pools.get(loop)
    if current is None:
        for old in [old for old in _pools if old.is_closed()]:
            del _pools[old]
        current = _pools[loop] = Pool()
    return current


async def stop() -> None:
    """Close the current loop's listening connection (tests, shutdown)."""
    current = _pools.pop(asyncio.get_running_loop(), None)
    if current is not None:
        await current.stop()
