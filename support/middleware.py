"""JSON error answers outside the admin site, debug on or off; 503 (JSON) when the database
fails outside a DRF view, e.g. in the admin site; and Django's own middleware without a thread
hop per hook."""

import json
import logging

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as messages
from django.contrib.sessions import middleware as sessions
from django.db import OperationalError
from django.middleware import clickjacking, common, csrf, security
from django.utils.deprecation import MiddlewareMixin
from rest_framework.response import Response

log = logging.getLogger("support.api")


class DatabaseUnavailableMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, OperationalError):
            return None
        from support.api.views_errors import database_unavailable

        log.warning("database unavailable: %s", exception)
        return database_unavailable()


# --- Django's own middleware, with its hooks run on the event loop ----------------------------
# Under ASGI, Django runs each sync hook of a MiddlewareMixin (process_request, process_view,
# process_response) through sync_to_async: one worker-thread hop per hook, fourteen per
# request for this stack, which cost more than the whole API request's own work. These hooks
# only read and set attributes and headers, so the subclasses below call them directly. The
# two that can touch the database (saving a session, storing messages into it) still go to a
# thread, and only when there is something to save.
HTML_SITES = ("/admin/", "/api-auth/")  # pages made for people, with sessions


def token_request(request) -> bool:
    """A request that carries an API token (``Authorization: Token <key>``) outside the HTML
    sites: no session, no messages, no admin user to load (DRF's authentication sets the user)."""
    return request.META.get("HTTP_AUTHORIZATION", "")[:6].lower() == "token " and (
        not request.path_info.startswith(HTML_SITES)
    )


class _InlineHooks:
    # The admin site's middleware sets this: a token request goes around it (the message
    # storage alone, built for every request, cost about 5 % of a request that does nothing).
    browser_only = False

    async def __acall__(self, request):
        if self.browser_only and token_request(request):
            return await self.get_response(request)
        response = None
        if hasattr(self, "process_request"):
            response = self.process_request(request)
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            if self.response_needs_thread(request):
                response = await sync_to_async(self.process_response)(request, response)
            else:
                response = self.process_response(request, response)
        return response

    def response_needs_thread(self, request) -> bool:
        return False


# The service's own response hook, run the same way.
class JsonErrorsMiddleware(_InlineHooks, MiddlewareMixin):
    """Error answers are JSON ``{"detail": ...}`` everywhere but the pages made for people.

    What no view answers (an unknown path, an error raised in a view or in a middleware)
    Django answers with the handlers of project/urls.py, which speak JSON, except with DEBUG
    on: then it sends its HTML technical pages instead (every URL pattern, a traceback),
    whatever the path. Such a body is replaced here, in every mode; the status and headers
    stay, and Django has already logged the traceback. Left alone: the admin site and the
    browsable API's login pages (HTML by design), and DRF's own answers (negotiated).
    """

    HTML_SITES = HTML_SITES
    DETAILS = {
        400: "Bad request.",
        403: "Forbidden.",
        404: "Not found.",
        405: "Method not allowed.",
        500: "Internal server error.",
    }

    def process_response(self, request, response):
        if (
            response.status_code < 400
            or response.streaming
            or isinstance(response, Response)
            or response.get("Content-Type", "").startswith("application/json")
            or request.path_info.startswith(self.HTML_SITES)
        ):
            return response
        detail = self.DETAILS.get(response.status_code, f"{response.reason_phrase}.")
        response.content = json.dumps({"detail": detail})
        response["Content-Type"] = "application/json"
        if response.has_header("Content-Length"):
            response["Content-Length"] = str(len(response.content))
        return response


class SecurityMiddleware(_InlineHooks, security.SecurityMiddleware):
    pass


class SessionMiddleware(_InlineHooks, sessions.SessionMiddleware):
    browser_only = True

    def response_needs_thread(self, request) -> bool:
        # Only a save reads or writes the database; a session merely read (DRF's session
        # authentication of a request without a token) is answered in place.
        session = getattr(request, "session", None)
        return session is not None and (session.modified or settings.SESSION_SAVE_EVERY_REQUEST)


class CommonMiddleware(_InlineHooks, common.CommonMiddleware):
    pass


class CsrfViewMiddleware(_InlineHooks, csrf.CsrfViewMiddleware):
    # The handler hops to a thread for a sync process_view; an async one runs in place.
    async def process_view(self, request, callback, callback_args, callback_kwargs):
        return super().process_view(request, callback, callback_args, callback_kwargs)


class AuthenticationMiddleware(_InlineHooks, auth.AuthenticationMiddleware):
    # Sets a lazy request.user (reading it in a sync view runs the query in that thread); on a
    # token request DRF's authentication sets it.
    browser_only = True


class MessageMiddleware(_InlineHooks, messages.MessageMiddleware):
    browser_only = True

    def response_needs_thread(self, request) -> bool:
        storage = getattr(request, "_messages", None)
        return storage is not None and (storage.used or storage.added_new)


class XFrameOptionsMiddleware(_InlineHooks, clickjacking.XFrameOptionsMiddleware):
    pass
