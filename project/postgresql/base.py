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

Here the check runs in :meth:`DatabaseWrapper.get_new_connection` instead: a broken connection
is closed and given back (the pool opens a replacement), the other idle connections are
checked at once (they most likely died the same way), and the request takes the next one
without sleeping, within its one pool wait. The pool gives up a failed connection attempt at
once (``reconnect_timeout=0``, set in ``project.settings``): nothing holds a place on a timer;
a request that waits asks again every ``ASK_AGAIN_AFTER`` seconds, and each ask lets the pool
make a new attempt. So the service serves again as soon as a
connection can be opened, and a request meets a dead connection only if it dies while in use.
"""

import threading
from time import monotonic

from django.core.exceptions import ImproperlyConfigured
from django.db.backends.postgresql import base
from psycopg import Error, IsolationLevel
from psycopg_pool import ConnectionPool, PoolTimeout

# A request that has waited this long for a connection asks the pool again, which lets it try
# to open one again if its last attempt failed (nothing else would before the next request).
ASK_AGAIN_AFTER = 0.5


class DatabaseWrapper(base.DatabaseWrapper):
    # One purge of the idle connections at a time per process: the threads that meet a dead
    # connection meanwhile only replace their own.
    _purging = threading.Lock()

    def get_new_connection(self, conn_params):
        pool = self.pool
        if pool is None:
            return super().get_new_connection(conn_params)
        if "isolation_level" in self.settings_dict["OPTIONS"]:
            raise ImproperlyConfigured("the pooled backend runs at READ COMMITTED only")
        self.isolation_level = IsolationLevel.READ_COMMITTED  # PostgreSQL's default, as Django's
        pool.open()
        deadline = monotonic() + pool.timeout
        while (remaining := deadline - monotonic()) > 0:
            try:
                connection = pool.getconn(timeout=min(remaining, ASK_AGAIN_AFTER))
            except PoolTimeout:
                continue
            try:
                ConnectionPool.check_connection(connection)
            except Error:
                self._discard(pool, connection)
            else:
                return connection
        raise PoolTimeout(f"couldn't get a connection after {pool.timeout:.2f} sec")

    def _discard(self, pool: ConnectionPool, connection) -> None:
        """Give back a dead connection (the pool replaces it), then check the idle ones."""
        connection.close()
        pool.putconn(connection)
        if self._purging.acquire(blocking=False):
            try:
                pool.check()  # each dead one closed and replaced, the live ones kept
            finally:
                self._purging.release()
