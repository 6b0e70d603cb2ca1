"""The admin list's two ways through its pages, read from the query string.

- ``?page=N`` (or ``last``) with ``?page_size=``: page numbers, as DRF's page-number paginator
  reads them. Deep pages cost an OFFSET, and ``last`` needs an exact count.
- ``?cursor=`` (empty: the first page): a walk in the default order (newest first) by
  position, each page costing its own rows wherever it is, and seeing every ticket once
  however many are created meanwhile (they are newer: only ``previous`` reaches them).

A cursor is opaque to clients: urlsafe base64 of the direction and the position, a ticket's
``created_at`` (in microseconds since the epoch) and id. Anything else is a 400.
"""

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from rest_framework import exceptions
from rest_framework.utils.urls import remove_query_param, replace_query_param

from support import services
from support.api.serializers import MAX_TICKET_ID
from support.models import Ticket

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
LAST_PAGE = "last"  # ?page=last, as DRF's page-number paginator reads it
CURSOR = "cursor"

LAST_NOT_COUNTED = (
    "The last page of a list this long is not counted: narrow the filter, or walk the list "
    "with ?cursor=."
)
BAD_CURSOR = "Invalid cursor: use the next and previous links as they are."
CURSOR_ALONE = "A cursor walks the default order by itself: leave out page and ordering."

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CURSOR_TEXT = re.compile(r"[A-Za-z0-9_-]{1,64}")
_POSITION = re.compile(r"([np]):(-?[0-9]{1,20}):([0-9]{1,19})")


def _positive_int(raw: str | None, default: int, ceiling: int) -> int | None:
    """A positive decimal integer, at most ``ceiling`` (any larger one, however many digits,
    is served as ``ceiling``); None when it is not one."""
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()):
        return None
    digits = raw.lstrip("0")
    if not digits:
        return None
    if len(digits) > len(str(ceiling)):  # never int() on thousands of digits
        return ceiling
    return min(int(digits), ceiling)


def page_size(request) -> int:
    """?page_size (default 20; larger than 100 is served as 100, as DRF's paginator clamps
    it)."""
    size = _positive_int(request.query_params.get("page_size"), DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if size is None:
        raise exceptions.ValidationError({"page_size": ["A positive integer is required."]})
    return size


def page_number(request) -> int | None:
    """?page (from 1; ``last``: None)."""
    raw_page = request.query_params.get("page")
    if raw_page == LAST_PAGE:
        return None
    # past the largest id any page could reach: past the end, so 404 later
    page = _positive_int(raw_page, 1, MAX_TICKET_ID + 1)
    if page is None:
        raise exceptions.NotFound("Invalid page.")
    return page


def page_url(request, page: int) -> str:
    url = request.build_absolute_uri()
    if page == 1:
        return remove_query_param(url, "page")
    return replace_query_param(url, "page", page)


@dataclass(frozen=True)
class Cursor:
    """Where a cursor page starts: next to ``position`` (None: the newest ticket), towards
    older tickets, or newer ones with ``newer``."""

    position: tuple[datetime, int] | None
    newer: bool = False


def cursor_param(request) -> Cursor | None:
    """The ?cursor= of the request (None: page numbers are used); 400 when it is not one of
    ours or comes with ?page= or ?ordering=."""
    raw = request.query_params.get(CURSOR)
    if raw is None:
        return None
    if any(name in request.query_params for name in ("page", "ordering")):
        raise exceptions.ValidationError({CURSOR: [CURSOR_ALONE]})
    if raw == "":
        return Cursor(None)
    match = None
    if _CURSOR_TEXT.fullmatch(raw):
        try:
            text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("ascii")
        except (binascii.Error, UnicodeDecodeError):
            text = ""
        match = _POSITION.fullmatch(text)
    if match is None:
        raise exceptions.ValidationError({CURSOR: [BAD_CURSOR]})
    direction, micros, pk = match.groups()
    try:
        created_at = _EPOCH + timedelta(microseconds=int(micros))
    except OverflowError:
        raise exceptions.ValidationError({CURSOR: [BAD_CURSOR]}) from None
    if not 1 <= int(pk) <= MAX_TICKET_ID:
        raise exceptions.ValidationError({CURSOR: [BAD_CURSOR]})
    return Cursor((created_at, int(pk)), newer=direction == "p")


def position(row: dict) -> tuple[datetime, int]:
    return row["created_at"], row["id"]


def cursor_url(request, at: tuple[datetime, int] | None, *, newer: bool = False) -> str:
    """The link to the page next to the position ``at`` (None: the first page)."""
    token = ""
    if at is not None:
        micros = (at[0] - _EPOCH) // timedelta(microseconds=1)
        text = f"{'p' if newer else 'n'}:{micros}:{at[1]}"
        token = base64.urlsafe_b64encode(text.encode("ascii")).decode("ascii").rstrip("=")
    return replace_query_param(request.build_absolute_uri(), CURSOR, token)


def numbered_page(request, queryset, page: int | None, size: int, count: int, exact: bool):
    """Links and rows of page ``page`` (None: the last) of ``queryset`` (None: every ticket,
    newest first). With an exact count, pages run up to the last (past it: 404); with a
    bounded one, a row more than the page tells whether a next page exists, and the last page
    is refused: nobody knows where it is."""
    if exact:
        last = max(1, -(-count // size))
        if page is None:
            page = last
        elif page > last:
            raise exceptions.NotFound("Invalid page.")
        wanted = size
    elif page is None:
        raise exceptions.ValidationError({"page": [LAST_NOT_COUNTED]})
    else:
        wanted = size + 1
    start = (page - 1) * size
    if queryset is None:
        rows = services.newest_tickets(start, wanted)
    else:
        rows = services.ticket_page(queryset, start, wanted)
    if not exact:
        if not rows and page > 1:
            raise exceptions.NotFound("Invalid page.")
        last = page + 1 if len(rows) > size else page
        rows = rows[:size]
    links = {
        "next": page_url(request, page + 1) if page < last else None,
        "previous": page_url(request, page - 1) if page > 1 else None,
    }
    return links, rows


def cursor_page(request, queryset, cursor: Cursor, size: int):
    """Links and rows of the page next to the cursor's position in ``queryset`` (None: every
    ticket)."""
    if queryset is None:
        queryset = Ticket.objects.all()
    rows, more = services.keyset_page(queryset, cursor.position, size, newer=cursor.newer)
    first = position(rows[0]) if rows else cursor.position
    last = position(rows[-1]) if rows else cursor.position
    if cursor.newer:
        # Older tickets lie behind this page: at least the page the cursor came from. With
        # nothing newer than the cursor, the first page is next.
        older = cursor_url(request, last if rows else None)
        newer = cursor_url(request, first, newer=True) if more else None
    else:
        older = cursor_url(request, last) if more else None
        # from the first page nothing is newer; from any other, the page it came from is
        newer = cursor_url(request, first, newer=True) if cursor.position else None
    return {"next": older, "previous": newer}, rows
