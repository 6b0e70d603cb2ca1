"""Django's PostgreSQL backend with a pool that recovers as soon as the database does.

psycopg_pool's own recovery suits a database that fails rarely and one connection at a time:

- its check on checkout finds broken connections one per try and sleeps between tries
  (1 s, 2 s, 4 s...), so after a restart, a failover or a mass ``pg_terminate_backend``,
  when every idle connection is dead, a request meets two or three of them and spends its
  whole pool wait (``DB_POOL_TIMEOUT``) asleep: 503 although the database is back;
- a replacement that fails while the database is down retries on a backoff schedule
  (1, 2, 4, 8, 16 s... for ``reconnect_timeout``, 5 minutes by default) and keeps its place in
  ``max_size`` meanwhile, so once the database is back the pool opens nothing new until those
  timers fire: 503s for tens of seconds.

Here:

- the check runs in :meth:`DatabaseWrapper.get_new_connection`: a broken connection is closed
  and given back (the pool opens a replacement), the other idle connections are checked at
  once (they most likely died the same way), and the request takes the next one without
  sleeping, within its one pool wait;
- a failed connection attempt gives up its place at once (``reconnect_timeout=0``: psycopg
  tries twice, then calls ``reconnect_failed``), and while requests wait for a connection
  :func:`retry_while_waiting` lets the pool try again every ``RETRY_EVERY`` seconds: the
  oldest waiter gets the first connection that opens, in the pool's first-come order, and
  nothing is tried while nobody waits (the next request's wait starts a new attempt).

So the service serves again as soon as a connection can be opened, a request meets a dead
connection only if it dies while in use, and a database that refuses connections sees at most
a few attempts per second from each worker. Why an attempt failed is in the ``psycopg.pool``
warnings of the log; the request itself answers 503 after ``DB_POOL_TIMEOUT``.
"""

import random
import threading
from time import monotonic

from django.core.exceptions import ImproperlyConfigured
from django.db.backends.postgresql import base
from psycopg import Error, IsolationLevel
from psycopg_pool import ConnectionPool, PoolTimeout

from project.handler import connection_deadline

# A request that queued for a thread until its last moment still gets this long for a
# connection: an idle one is handed over at once.
MIN_WAIT = 0.05
RETRY_EVERY = 0.25  # seconds between attempts while requests wait and the database refuses
# A generator of its own, seeded from the system: the process-wide one is left to the program
# that seeds it (tests, Hypothesis), and this module's draws from another thread never move it.
_jitter = random.Random()  # noqa: S311 (timing jitter, not a secret)

_retry_pending = threading.Lock()  # one scheduled retry at a time per process


def retry_while_waiting(pool: ConnectionPool) -> None:
    """psycopg_pool's ``reconnect_failed`` callback: an attempt failed and gave up its place.

    If requests are waiting, ask the pool to try again shortly; ``check()`` lets it grow by
    one connection (and checks the idle ones, of which there are none while it fails)."""
    if pool.get_stats().get("requests_waiting", 0) == 0 or not _retry_pending.acquire(False):
        return

    def retry():
        _retry_pending.release()
        if not pool.closed:
            pool.check()

    timer = threading.Timer(RETRY_EVERY * _jitter.uniform(0.8, 1.2), retry)
    timer.daemon = True
    timer.start()


class DatabaseWrapper(base.DatabaseWrapper):
    # One purge of the idle connections at a time per process: the threads that meet a dead
    # connection meanwhile only replace their own.
    _purging = threading.Lock()

    def __init__(self, settings_dict, alias="default"):
        pool = settings_dict.get("OPTIONS", {}).get("pool")
        if isinstance(pool, dict):
            pool.setdefault("reconnect_timeout", 0)
            pool.setdefault("reconnect_failed", retry_while_waiting)
        super().__init__(settings_dict, alias)

    def get_new_connection(self, conn_params):
        pool = self.pool
        if pool is None:
            return super().get_new_connection(conn_params)
        if "isolation_level" in self.settings_dict["OPTIONS"]:
            raise ImproperlyConfigured("the pooled backend runs at READ COMMITTED only")
        self.isolation_level = IsolationLevel.READ_COMMITTED  # PostgreSQL's default, as Django's
        pool.open()
        deadline = monotonic() + pool.timeout
        waited = connection_deadline()  # part of the wait was spent queueing for a thread
        if waited is not None:
            deadline = min(deadline, max(waited, monotonic() + MIN_WAIT))
        while (remaining := deadline - monotonic()) > 0:
            connection = pool.getconn(timeout=remaining)  # raises PoolTimeout when it is up
            try:
                ConnectionPool.check_connection(connection)
            except Error:
                self._discard(pool, connection)
            else:
                return connection
        raise PoolTimeout(f"couldn't get a working connection after {pool.timeout:.2f} sec")

    def _discard(self, pool: ConnectionPool, connection) -> None:
        """Give back a dead connection (the pool replaces it), then check the idle ones."""
        connection.close()
        pool.putconn(connection)
        if self._purging.acquire(blocking=False):
            try:
                pool.check()  # each dead one closed and replaced, the live ones kept
            finally:
                self._purging.release()
