"""The API's base view: DRF's checks and the handler's database work in one worker-thread hop,
the JSON answer rendered on the event loop."""

from adrf import views
from asgiref.sync import iscoroutinefunction, sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpResponse
from rest_framework import views as drf_views
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from support import housekeeping
from support.api import idempotency


def rendered(response):
    """A JSON answer rendered here, on the event loop, as a plain HttpResponse.

    Django's handler renders a DRF Response in a thread hop of its own, a second hop for every
    API request. The browsable API's HTML pages (their forms may read the database) are left to
    it.
    """
    if not isinstance(response, Response) or not isinstance(
        response.accepted_renderer, JSONRenderer
    ):
        return response
    response.render()
    plain = HttpResponse(response.content, status=response.status_code, headers=response.headers)
    if "Content-Type" not in response:  # an empty body (204) has none
        del plain["Content-Type"]
    plain.cookies = response.cookies
    return plain


class APIView(views.APIView):
    """adrf's APIView, with one thread hop per request instead of two.

    adrf awaits DRF's ``initial`` (authentication, permissions, throttles; the token query) in
    a hop of its own, then the handler makes another for its database work. Here the async
    handler calls ``await self.in_thread(work, ...)``, which runs ``initial`` and then ``work``
    in one hop: the token query, the transaction and the reads that build the answer share one
    thread and one pooled connection. A handler that answers without ``in_thread`` has skipped
    the checks: that is refused as a server error, never served.
    """

    # True on a view whose POST changes something: an Idempotency-Key makes it safe to retry
    # (support.api.idempotency), in the same hop.
    idempotency_keys = False

    def idempotency_credential(self) -> str:
        """What besides the user a keyed answer is stored under (support.api.login's)."""
        return ""

    def check_throttles(self, request):
        # adrf's version always goes back to the event loop (async_to_sync) for the async
        # throttles, even when there are none, from the worker thread and back: a second hop.
        # Every throttle here is sync, so DRF's own check does.
        if any(iscoroutinefunction(t.allow_request) for t in self.get_throttles()):
            return super().check_throttles(request)
        return drf_views.APIView.check_throttles(self, request)

    async def in_thread(self, work, *args, **kwargs):
        def checks_then_work():
            request = self.request
            self.initial(request, *self.args, **self.kwargs)
            key = None
            if self.idempotency_keys and request.method == "POST":
                key = idempotency.request_key(request)
            if key is None:
                return work(*args, **kwargs)
            return idempotency.keyed(
                self, key, lambda: work(*args, **kwargs), credential=self.idempotency_credential()
            )

        # the checks run first in the call, or the call fails (no thread free: 503)
        self._checked = True
        housekeeping.ensure_running()  # the process's background task, started once per loop
        return await sync_to_async(checks_then_work)()

    async def then_in_thread(self, work, *args, **kwargs):
        """A later hop of a request whose checks ``in_thread`` has run (a waiting fetch's next
        look at the pool): the checks are not repeated (a throttle would count it twice)."""
        if not self._checked:
            raise ImproperlyConfigured("then_in_thread() before in_thread()")
        return await sync_to_async(work)(*args, **kwargs)

    async def async_dispatch(self, request, *args, **kwargs):
        # adrf's async_dispatch, but for where ``initial`` runs.
        self.args = args
        self.kwargs = kwargs
        request = self.initialize_request(request, *args, **kwargs)
        self.request = request
        self.headers = self.default_response_headers
        self._checked = False
        try:
            method = request.method.lower()
            handler = getattr(self, method, None) if method in self.http_method_names else None
            if handler is None:
                handler = self.http_method_not_allowed
            if iscoroutinefunction(handler):
                try:
                    response = await handler(request, *args, **kwargs)
                finally:
                    # an answer, or an error, from a handler that skipped the checks
                    if not self._checked:
                        raise ImproperlyConfigured(
                            f"{type(self).__name__}.{method} answered without in_thread()"
                        )
            else:  # DRF's own sync handlers: OPTIONS, 405
                response = await self.in_thread(handler, request, *args, **kwargs)
        except Exception as exc:
            response = self.handle_exception(exc)
        self.response = self.finalize_response(request, response, *args, **kwargs)
        return rendered(self.response)
