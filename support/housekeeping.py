"""A worker process's background work: writing agents' presence, the idle sweep, and removing
expired idempotency keys.

One asyncio task per worker process, started by the process's first API request on its event
loop (:func:`ensure_running`, from ``support.api.views.APIView.in_thread``: after that, a
look at the task per request). It runs, with jitter so that a fleet's workers do not act in
step:

- every ``SUPPORT_PRESENCE_FLUSH_SECONDS``: :func:`support.presence.flush`;
- when ``SUPPORT_AGENT_IDLE_RELEASE_SECONDS`` is set, every quarter of it: the flush, then
  :func:`support.services.idle_release.idle_agents_release` (which does nothing while another
  process's sweep runs: its advisory lock);
- every ``PURGE_EVERY`` seconds: the expired idempotency keys' purge
  (:func:`support.api.idempotency.purge_batch`: batches that skip rows in use, so no request
  waits on it), for ``PURGE_SLICE`` seconds at most; a backlog (after the workers were down)
  is worked through slice after slice, with the flush and the sweep keeping their times in
  between, since they share this thread (a flush held up would let another worker's sweep
  judge this worker's agents silent).

Their database work runs on a thread of its own (one per process), never on a request thread
(project.handler), so it is no request's thread hop and holds no request up; after each run the
thread gives its connection back to the pool, so the task holds none while it sleeps. A failure
(the database down, a lock wait timed out) is logged and tried again at the next tick. The
settings are read at each tick.

The task belongs to the loop it was started on: under pytest-asyncio each test has its own
loop, closed (and its tasks cancelled) at the test's end, and the next request on another loop
starts a new task. ``python manage.py release_idle_agents`` runs the same sweep from cron,
``python manage.py purge_idempotency_keys`` the same purge.
"""

import asyncio
import contextvars
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.db import connections

from support import presence
from support.api.idempotency import PURGE_BATCH, purge_batch
from support.services.idle_release import idle_agents_release

log = logging.getLogger("support.housekeeping")

JITTER = 0.2  # each wait is its interval times a random factor in [1 - JITTER, 1 + JITTER]
# A generator of its own, seeded from the system: the process-wide one is left to the program
# that seeds it (tests, Hypothesis), and this module's draws from another thread never move it.
_jitter = random.Random()  # noqa: S311 (timing jitter, not a secret)
PURGE_EVERY = 300.0  # seconds between purges of expired idempotency keys (kept 24 h by default)
# seconds of purging per turn, then as long again for the other work (a batch of 1,000 keys:
# about 60 ms on the test machine)
PURGE_SLICE = 0.25

_task: asyncio.Task | None = None
_executor: ThreadPoolExecutor | None = None


def ensure_running() -> None:
    """Start this process's background task on the running loop, unless one runs there already
    (a server has one loop; tests have one per test)."""
    if _task is not None and not _task.done() and _task.get_loop() is asyncio.get_running_loop():
        return
    _start()


def _start() -> None:
    global _task, _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="support-housekeeping")
    loop = asyncio.get_running_loop()
    # A context of its own: not the request's that started it (its request id, its thread).
    _task = loop.create_task(_run(), name="support-housekeeping", context=contextvars.Context())


async def _run() -> None:
    loop = asyncio.get_running_loop()
    next_flush = _later(settings.SUPPORT_PRESENCE_FLUSH_SECONDS)
    next_sweep = _first_sweep() if _sweep_every() else None
    next_purge = _later(PURGE_EVERY)
    while True:
        wake = min(t for t in (next_flush, next_sweep, next_purge) if t is not None)
        await asyncio.sleep(max(0.0, wake - time.monotonic()))
        sweep_every = _sweep_every()
        if not sweep_every:
            next_sweep = None
        elif next_sweep is None:  # turned on since the last tick
            next_sweep = _first_sweep()
        if next_sweep is not None and time.monotonic() >= next_sweep:
            await loop.run_in_executor(_executor, _job, flush_and_sweep)
            next_sweep = _later(sweep_every)
            next_flush = _later(settings.SUPPORT_PRESENCE_FLUSH_SECONDS)
        elif time.monotonic() >= next_flush:
            await loop.run_in_executor(_executor, _job, presence.flush)
            next_flush = _later(settings.SUPPORT_PRESENCE_FLUSH_SECONDS)
        if time.monotonic() >= next_purge:
            more = await loop.run_in_executor(_executor, _job, purge_slice)
            next_purge = time.monotonic() + PURGE_SLICE if more else _later(PURGE_EVERY)


def _later(seconds: float) -> float:
    """When to run next: ``seconds`` from now, give or take JITTER."""
    return time.monotonic() + seconds * _jitter.uniform(1 - JITTER, 1 + JITTER)


def _first_sweep() -> float:
    """A worker's first sweep waits two flush intervals at least: after a restart (the marks
    in memory lost), the workers started with it have written their agents' presence by then,
    so that an agent is not judged on what the database knew before the restart."""
    return _later(max(_sweep_every(), 2 * settings.SUPPORT_PRESENCE_FLUSH_SECONDS))


def _sweep_every() -> float:
    """Seconds between sweeps; 0 when idle release is off."""
    return settings.SUPPORT_AGENT_IDLE_RELEASE_SECONDS / 4


def flush_and_sweep() -> None:
    """This process's marks first, so that its own agents are judged on them; then the sweep.
    A failed flush raises: no sweep without them."""
    presence.flush()
    idle_agents_release(idle_seconds=settings.SUPPORT_AGENT_IDLE_RELEASE_SECONDS)


def purge_slice() -> bool:
    """Purge expired keys, whole batches, for PURGE_SLICE seconds at most. True when it stopped
    with expired keys left."""
    deadline = time.monotonic() + PURGE_SLICE
    while purge_batch() == PURGE_BATCH:
        if time.monotonic() >= deadline:
            return True
    return False


def _job(work):
    """Run ``work`` on the housekeeping thread and return its result (None when it failed:
    logged, and tried again at its next time); give the connection back."""
    try:
        return work()
    except Exception:
        log.warning("background %s failed; tried again later", work.__name__, exc_info=True)
        return None
    finally:
        connections.close_all()
