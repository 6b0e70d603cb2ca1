"""Rate limits. Counters live in Django's cache, a database table shared by every worker
process (and host), so running more workers does not multiply a limit.

Rates come from ``settings.SUPPORT_THROTTLE_RATES`` when a request is checked (``None``: no
limit; "5/15min" style, see ``project.env.parse_rate``). The client address is the one uvicorn
took from the trusted proxy (REST_FRAMEWORK's NUM_PROXIES is 0, so DRF itself believes no
X-Forwarded-For).

Logins are limited three ways (README, "Roles and authentication"): every attempt per address
(``LoginByAddressThrottle``), and failed logins per username from one address and per username
from every address (``LoginFailureLimits``, around the password check).
"""

import hashlib
import ipaddress
import math
import time

from django.conf import settings
from django.core.cache import cache
from rest_framework.exceptions import Throttled
from rest_framework.throttling import SimpleRateThrottle

from project.env import parse_rate

clock = time.time  # the failure windows' clock, in seconds (replaceable, to hold it still)


def client_address(request) -> str:
    """The address the limits count: an IPv6 address stands for its /64, the block one
    subscriber usually holds (else each guess could come from a new address)."""
    address = request.META.get("REMOTE_ADDR") or ""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _SettingsRateThrottle(SimpleRateThrottle):
    def get_rate(self):
        return settings.SUPPORT_THROTTLE_RATES.get(self.scope)

    def parse_rate(self, rate):
        # DRF's reads only the unit's first letter: "5/15min" would be 5 a minute.
        return parse_rate(rate) if rate else (None, None)


class LoginByAddressThrottle(_SettingsRateThrottle):
    """Login attempts per client address, whatever their outcome: many names tried from one
    place, and the password-hashing work one address can ask for."""

    scope = "login_address"

    def allow_request(self, request, view):
        if request.method != "POST":  # only attempts count
            return True
        return super().allow_request(request, view)

    def get_cache_key(self, request, view):
        return self.cache_format % {"scope": self.scope, "ident": client_address(request)}


class UserRateThrottle(_SettingsRateThrottle):
    """Requests per authenticated user (off unless SUPPORT_USER_RATE is set)."""

    scope = "user"

    def get_cache_key(self, request, view):
        if not (request.user and request.user.is_authenticated):
            return None
        return self.cache_format % {"scope": self.scope, "ident": request.user.pk}


class LoginFailureLimits:
    """Failed logins for one username: from this address (tight) and from every address
    (loose). Only failures count, so a guesser elsewhere cannot lock the owner out until the
    loose limit is reached.

    Each failure is one cache entry: a numbered slot of the rate's current window (fixed
    windows, so a limit of N lets at most 2N through across a window's boundary). ``take``
    claims a slot with ``cache.add`` before the password is checked — atomic through the
    table's primary key, so concurrent guesses on any worker cannot all slip under the limit —
    and a right password gives it back. The name need not exist: unknown names are counted,
    and answered, exactly like real ones.
    """

    PAIR = "login_failures_username_address"
    USERNAME = "login_failures_username"
    CLOCK_SLACK = 60  # seconds a slot outlives its window: workers' clocks may differ a little

    def __init__(self, username: str, address: str):
        name = username.lower()
        self._idents = {self.PAIR: f"{name}\0{address}", self.USERNAME: name}
        self._taken: list[str] = []
        self._windows: dict[str, tuple[list[str], float]] = {}

    def take(self) -> None:
        """Count this attempt as a failure in every window, or raise Throttled (429, nothing
        counted) when one of them is full."""
        now = clock()
        self._windows = {
            scope: window
            for scope, ident in self._idents.items()
            if (window := self._window(scope, ident, now))
        }
        slots = [key for keys, _ in self._windows.values() for key in keys]
        used = cache.get_many(slots) if slots else {}
        full = [ends for keys, ends in self._windows.values() if all(k in used for k in keys)]
        if full:
            raise self._refused(max(full) - now)
        for keys, ends in self._windows.values():
            timeout = ends - now + self.CLOCK_SLACK
            if not any(k not in used and self._claim(k, timeout) for k in keys):
                self.give_back()  # filled meanwhile by concurrent attempts
                raise self._refused(ends - now)

    def give_back(self) -> None:
        """Uncount this attempt (the password was right, or it could not be checked)."""
        if self._taken:
            cache.delete_many(self._taken)
            self._taken = []

    def succeeded(self) -> None:
        """The password was right: uncount it, and forget this address's failures for the
        name (not the name's total)."""
        pair_slots = self._windows.get(self.PAIR, ([], 0))[0]
        cache.delete_many([*self._taken, *pair_slots])
        self._taken = []

    def _claim(self, key: str, timeout: float) -> bool:
        if cache.add(key, 1, timeout=timeout):
            self._taken.append(key)
            return True
        return False

    @staticmethod
    def _window(scope: str, ident: str, now: float) -> tuple[list[str], float] | None:
        """The slot keys of the current window and the time it ends; None without a limit."""
        rate = settings.SUPPORT_THROTTLE_RATES.get(scope)
        if not rate:
            return None
        count, period = parse_rate(rate)
        index = int(now // period)
        # Hashed: any text may arrive here (NUL included), and a cache key must stay plain.
        digest = hashlib.sha256(ident.encode("utf-8", "replace")).hexdigest()
        prefix = f"{scope}:{period}:{index}:{digest}"
        return [f"{prefix}:{n}" for n in range(count)], (index + 1) * period

    @staticmethod
    def _refused(wait: float) -> Throttled:
        return Throttled(
            wait=max(1, math.ceil(wait)),
            detail="Too many failed logins for this username; try again later.",
        )
