"""Rate limits. Counters live in Django's cache, a database table shared by every worker
process (and host), so running more workers does not multiply a limit.

Rates come from ``settings.SUPPORT_THROTTLE_RATES`` when a request is checked (``None``: no
limit); the client address is the one uvicorn took from the trusted proxy (REST_FRAMEWORK's
NUM_PROXIES is 0, so DRF itself believes no X-Forwarded-For).
"""

import hashlib

from django.conf import settings
from rest_framework.throttling import SimpleRateThrottle


class _SettingsRateThrottle(SimpleRateThrottle):
    def get_rate(self):
        return settings.SUPPORT_THROTTLE_RATES.get(self.scope)


class _LoginThrottle(_SettingsRateThrottle):
    def allow_request(self, request, view):
        if request.method != "POST":  # only attempts count
            return True
        return super().allow_request(request, view)


class LoginByUsernameThrottle(_LoginThrottle):
    """Login attempts per username, whoever makes them."""

    scope = "login_username"

    def get_cache_key(self, request, view):
        username = request.data.get("username") if isinstance(request.data, dict) else None
        if not isinstance(username, str) or not username:
            return None  # the serializer refuses it; nothing to count
        # Hashed: any text may arrive here (NUL included), and a cache key must stay plain.
        ident = hashlib.sha256(username.lower().encode("utf-8", "replace")).hexdigest()
        return self.cache_format % {"scope": self.scope, "ident": ident}


class LoginByAddressThrottle(_LoginThrottle):
    """Login attempts per client address."""

    scope = "login_address"

    def get_cache_key(self, request, view):
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


class UserRateThrottle(_SettingsRateThrottle):
    """Requests per authenticated user (off unless SUPPORT_USER_RATE is set)."""

    scope = "user"

    def get_cache_key(self, request, view):
        if not (request.user and request.user.is_authenticated):
            return None
        return self.cache_format % {"scope": self.scope, "ident": request.user.pk}
