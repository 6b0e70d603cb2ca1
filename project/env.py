"""Small typed readers for environment settings that fail loudly on a bad value."""

import os
import re

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {value}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {value}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


_PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_UNITS = {  # each spelling -> its first letter's period
    *("s", "sec", "secs", "second", "seconds"),
    *("m", "min", "mins", "minute", "minutes"),
    *("h", "hr", "hrs", "hour", "hours"),
    *("d", "day", "days"),
}
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*", re.IGNORECASE)


def parse_rate(text: str) -> tuple[int, int]:
    """``"5/15min"`` -> ``(5, 900)``: a count per period in seconds. Also DRF's forms
    (``"120/min"``, ``"10/m"``, ``"100/hour"``), which read no multiplier."""
    match = _RATE.fullmatch(text)
    unit = match[3].lower() if match else ""
    if unit not in _UNITS:
        raise ValueError(f"not a rate like '5/15min' or '100/hour': {text!r}")
    count, times = int(match[1]), int(match[2] or 1)
    if count < 1 or times < 1:
        raise ValueError(f"a rate needs a positive count and period: {text!r}")
    return count, times * _PERIODS[unit[0]]


def env_rate(name: str, default: str, *, max_count: int | None = None) -> str | None:
    """A rate (see parse_rate), checked now; empty means no limit (None)."""
    raw = os.environ.get(name, default).strip()
    if not raw:
        return None
    try:
        count, _ = parse_rate(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}: {exc}") from None
    if max_count is not None and count > max_count:
        raise ImproperlyConfigured(f"{name}: at most {max_count} per period, got {raw!r}")
    return raw
