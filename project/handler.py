"""Django's ASGI handler, paying the async stack's costs once per request.

How a request flows: uvicorn hands it to this handler on the worker's event loop; the middleware
runs there (support/middleware.py keeps Django's hooks off threads); an API view does all of its
blocking work (token check, permissions, throttles, the transaction, the reads of its answer) in
one call to a worker thread (support/api/views.py) and renders its JSON back on the loop. That
thread comes from a per-process pool of single-thread executors (asgiref's
``ThreadSensitiveContext(executor=...)``): Django's own handler starts a new thread for every
request and joins it at the end, which cost about half of a bare view's time. The work Django
hangs on the request signals (forget the debug query log, give database connections back)
happens at the end of each call on the thread itself, and the URLconf reset on the loop, not in
calls of their own; the signals are still sent, the Django way, when anything else listens.

The pool is bounded (``SUPPORT_REQUEST_THREADS``, by default the database pool's size: a thread
beyond it would only wait for a connection). A request takes a thread at its first blocking call
and gives it back when its answer is ready, before the answer is sent, so slow readers hold none;
while all are taken, requests queue on the loop, first come first served, for up to
``DB_POOL_TIMEOUT`` (then 503, as when the database pool is exhausted).
"""

import asyncio
import contextlib
import contextvars
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.core import signals
from django.core.cache import close_caches
from django.core.exceptions import RequestAborted
from django.core.handlers import asgi, base
from django.db import OperationalError, close_old_connections, reset_queries
from django.urls import set_script_prefix, set_urlconf
from django.utils.log import log_response


class ThreadsBusy(OperationalError):
    """No request thread came free in time: answered 503 with Retry-After, like a full pool."""


_hop = threading.local()


def connection_deadline() -> float | None:
    """When the current call must have its database connection by (``time.monotonic()``), if
    its request already spent part of ``DB_POOL_TIMEOUT`` waiting for a thread: one request
    waits for capacity, a thread and then a connection, that long in all."""
    return getattr(_hop, "deadline", None)


def _run_hop(call: "_Call"):
    """One blocking call of a request, on its thread, with the request signals' work around it."""
    if call.first:
        reset_queries()
    _hop.deadline = call.deadline
    try:
        return call.fn(*call.args, **call.kwargs)
    finally:
        _hop.deadline = None
        # With the pool (CONN_MAX_AGE 0) every connection the call took goes back to it here,
        # so an idle thread holds none.
        close_old_connections()
        close_caches()


@dataclass
class _Call:
    future: Future
    first: bool
    fn: Callable
    args: tuple
    kwargs: dict
    deadline: float | None = None
    thread: "_PoolThread | None" = None

    def run(self) -> None:
        try:
            if not self.future.set_running_or_notify_cancel():
                return  # the caller gave up while waiting for a thread
            try:
                result = _run_hop(self)
            except BaseException as exc:
                self.future.set_exception(exc)
            else:
                self.future.set_result(result)
        finally:
            self.thread.call_done()


class _PoolThread(ThreadPoolExecutor):
    """One pooled thread. It goes back to the pool only once its calls have finished: a
    request whose client went away stops waiting for its call (asgiref lets it go on), and
    the next request must not queue behind that call with no deadline."""

    def __init__(self, threads: "RequestThreads"):
        super().__init__(max_workers=1, thread_name_prefix="request")
        self._pool = threads  # (ThreadPoolExecutor has its own _threads)
        self._lock = threading.Lock()
        self._running = 0
        self._back_on: asyncio.AbstractEventLoop | None = None  # released while running

    def run(self, call: _Call) -> None:
        call.thread = self
        with self._lock:
            self._running += 1
        self.submit(call.run)

    def call_done(self) -> None:  # on the pool thread
        with self._lock:
            self._running -= 1
            loop = self._back_on if self._running == 0 else None
            if loop is not None:
                self._back_on = None
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to give it to
                loop.call_soon_threadsafe(self._pool._give_back, self)

    def release(self) -> None:  # on the loop
        with self._lock:
            if self._running:
                self._back_on = asyncio.get_running_loop()
                return
        self._pool._give_back(self)


class RequestThreads:
    """A process's request threads: single-thread executors, reused; at most ``size``.

    Used from the event loop's thread only (asgiref submits there), so no lock.
    """

    def __init__(self, size: int, wait_timeout: float):
        self.size = size
        self.wait_timeout = wait_timeout
        self.started = 0
        self._idle: list[_PoolThread] = []
        self._waiting: deque[RequestThread] = deque()

    def _lease(self, requester: "RequestThread") -> "_PoolThread | None":
        if self._idle:
            return self._idle.pop()  # the most recently used: its stack is warm
        if self.started < self.size:
            self.started += 1
            return _PoolThread(self)
        self._waiting.append(requester)
        return None

    def _give_back(self, executor: "_PoolThread") -> None:
        while self._waiting:
            if self._waiting.popleft()._receive(executor):
                return
        self._idle.append(executor)

    @property
    def waiting(self) -> int:
        return sum(1 for requester in self._waiting if requester._pending)


class RequestThread(Executor):
    """The executor of one request: a pooled thread, taken at the first call, given back by
    ``release()`` (taken again if the request makes another call after)."""

    def __init__(self, threads: RequestThreads):
        self._threads = threads
        self._executor: _PoolThread | None = None
        self._expired = False  # once a wait for a thread expired, later calls fail at once
        self._pending: list[_Call] = []
        self._queued_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._first = True

    def submit(self, fn, /, *args, **kwargs) -> Future:
        call = _Call(Future(), self._first, fn, args, kwargs)
        self._first = False
        if self._executor is None and not self._pending:
            if self._expired:
                # e.g. Django's exception hook after a view's call found no thread: the
                # request is answered 503 now rather than after a second full wait
                call.future.set_exception(ThreadsBusy("no request thread free"))
                return call.future
            self._executor = self._threads._lease(self)
        if self._executor is not None:
            self._executor.run(call)
        else:
            if not self._pending:
                self._queued_at = time.monotonic()
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self._threads.wait_timeout, self._expire)
            self._pending.append(call)
        return call.future

    def _receive(self, executor: "_PoolThread") -> bool:
        """A thread for this request's waiting calls; False when it waits no more."""
        if not self._pending:
            return False
        self._cancel_timer()
        self._executor = executor
        deadline = self._queued_at + self._threads.wait_timeout
        for call in self._pending:
            call.deadline = deadline
            executor.run(call)
        self._pending.clear()
        return True

    def _expire(self) -> None:
        self._timer = None
        self._expired = True
        pending, self._pending = self._pending, []
        seconds = self._threads.wait_timeout
        for call in pending:
            if call.future.set_running_or_notify_cancel():
                call.future.set_exception(ThreadsBusy(f"no request thread free in {seconds} s"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def release(self) -> None:
        """Give the thread back, once a call still running on it has finished."""
        self._cancel_timer()
        for call in self._pending:
            call.future.cancel()
        self._pending.clear()
        if self._executor is not None:
            executor, self._executor = self._executor, None
            executor.release()


_request_thread: contextvars.ContextVar[RequestThread] = contextvars.ContextVar("request_thread")


def release_request_thread() -> None:
    """Give the current request's thread back to the pool (e.g. before a long wait)."""
    thread = _request_thread.get(None)
    if thread is not None:
        thread.release()


def disconnect_django_receivers() -> None:
    """Django's own request-signal receivers off: their work is done at the end of each call on
    the request's thread (_run_hop) and, for the URLconf, in _close. (Django's test client
    connects close_old_connections again after each of its requests.)"""
    signals.request_started.disconnect(reset_queries)
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_caches)
    signals.request_finished.disconnect(base.reset_urlconf)


BUSY = b'{"detail": "The service is busy; try again shortly."}'


class PooledASGIHandler(asgi.ASGIHandler):
    """Django's ASGIHandler with pooled request threads and no thread hops of its own."""

    def __init__(self):
        super().__init__()
        disconnect_django_receivers()
        self.threads = RequestThreads(
            size=settings.SUPPORT_REQUEST_THREADS, wait_timeout=settings.DB_POOL_TIMEOUT
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        thread = RequestThread(self.threads)
        token = _request_thread.set(thread)
        started = False

        async def tracked_send(message):
            nonlocal started
            started = True
            await send(message)

        try:
            async with ThreadSensitiveContext(executor=thread):
                await self.handle(scope, receive, tracked_send)
        except ThreadsBusy:
            # A call outside the view (a signal listener's) found no thread: answered as the
            # view's own calls are. (Django answers a sync view's through handler500.)
            if started:
                raise
            headers = [(b"content-type", b"application/json"), (b"retry-after", b"1")]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": BUSY})
        finally:
            thread.release()
            _request_thread.reset(token)

    async def run_get_response(self, request):
        response = await super().run_get_response(request)
        release_request_thread()  # the answer is ready; sending it needs no thread
        return response

    async def get_response_async(self, request):
        # BaseHandler.get_response_async, logging a 4xx/5xx answer in place rather than in a
        # hop to the default executor (the log handlers write a line to a stream).
        set_urlconf(settings.ROOT_URLCONF)
        response = await self._middleware_chain(request)
        response._resource_closers.append(request.close)
        if response.status_code >= 400:
            log_response(
                "%s: %s", response.reason_phrase, request.path, response=response, request=request
            )
        return response

    async def handle(self, scope, receive, send):
        # ASGIHandler.handle (Django 5.2), but closing the response in place when nothing
        # listens to request_finished: Django closes it in a thread hop of its own.
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        try:
            await self._handle(scope, body_file, receive, send)
        finally:
            body_file.close()  # also when a call found no thread free

    async def _handle(self, scope, body_file, receive, send):
        set_script_prefix(asgi.get_script_prefix(scope))
        await signals.request_started.asend(sender=self.__class__, scope=scope)
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            await self.send_response(error_response, send)
            await self._close(error_response)
            return

        async def process_request(request, send):
            response = await self.run_get_response(request)
            with contextlib.suppress(asyncio.CancelledError):  # the client went away
                await self.send_response(response, send)
            return response

        tasks = [
            asyncio.create_task(self.listen_for_disconnect(receive)),
            asyncio.create_task(process_request(request, send)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # The request itself cancelled (the server shutting down, an in-process client
            # giving up): its tasks end with it; a waiting fetch leaves its queue at once.
            for task in tasks:
                task.cancel()
            raise
        for task in tasks:
            if task.done():
                with contextlib.suppress(RequestAborted):
                    task.result()
            else:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        try:
            response = tasks[1].result()
        except asyncio.CancelledError:
            await signals.request_finished.asend(sender=self.__class__)
        else:
            await self._close(response)

    async def _close(self, response) -> None:
        set_urlconf(None)  # django.core.handlers.base.reset_urlconf
        if signals.request_finished.has_listeners(self.__class__):
            await sync_to_async(response.close)()
        else:
            response.close()
