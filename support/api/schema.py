"""What the OpenAPI schema says beyond the serializers: error bodies and the answers each
endpoint really gives (drf-spectacular reads these through @extend_schema)."""

from drf_spectacular.drainage import set_override
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, inline_serializer
from rest_framework import serializers

from support.api.auth import LogoutAuthentication
from support.api.filters import TicketFilter
from support.api.serializers import (
    PRIORITY_NAMES,
    STATUS_NAMES,
    FeedEventSerializer,
    TicketSerializer,
)

# The logout's token check is the token scheme ("tokenAuth"), which also knows the token a keyed
# logout revoked: one security scheme, not two.
set_override(LogoutAuthentication, "suppress_collision_warning", True)


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()


class TransitionRefusedSerializer(serializers.Serializer):
    """A 409: the state machine's refusal (with ``current_status`` and ``allowed``), or an
    Idempotency-Key whose first request still runs (``detail`` alone, with Retry-After)."""

    detail = serializers.CharField()
    current_status = serializers.ChoiceField(choices=STATUS_NAMES, required=False)
    allowed = serializers.ListField(
        child=serializers.ChoiceField(choices=STATUS_NAMES), required=False
    )


# A 400 with field errors: {"field": ["message", ...]} (or {"detail": ...} for unreadable JSON).
FIELD_ERRORS = OpenApiResponse(
    inline_serializer(
        "FieldErrors",
        {"field_name": serializers.ListField(child=serializers.CharField(), required=False)},
    ),
    description='Invalid input: {"field": ["message"]}, or {"detail"} when the JSON is unreadable.',
)
ERROR_TEXT = {
    401: "No or bad credentials (answered with `WWW-Authenticate: Token`).",
    403: "Authenticated, but not in the role this endpoint needs.",
    404: "Not found.",
    304: "Not modified: If-None-Match names the current version (no body; with `ETag`).",
    409: "A rule forbids this change now; `detail` says which.",
    413: "Request body over the configured limit (1 MiB by default).",
    415: "The body is not JSON.",
    412: (
        "If-Match does not name the ticket's current version: nothing changed. `ETag` is the "
        "current one."
    ),
    422: (
        "This Idempotency-Key was used for another request (method, path, If-Match, body or a "
        "logout's token differ)."
    ),
    428: "If-Match is required on ticket writes here (SUPPORT_REQUIRE_IF_MATCH) and missing.",
    429: "Too many requests (with `Retry-After`, in seconds).",
    503: "The database is unavailable or a lock wait timed out (with `Retry-After`).",
}


def answers(ok: dict, *codes: int, field_errors: bool = False) -> dict:
    """``ok`` (status -> body) plus the listed error codes, each with its body shape."""
    responses = dict(ok)
    if field_errors:
        responses[400] = FIELD_ERRORS
    # 429: the per-user rate (SUPPORT_USER_RATE) may apply anywhere; 503: the database.
    for code in sorted({*codes, 429, 503}):
        responses[code] = OpenApiResponse(ErrorSerializer, description=ERROR_TEXT[code])
    return responses


def body_errors() -> tuple[int, ...]:
    return (413, 415)


# --- Safe retries and edits (support.api.idempotency, support.api.conditional) --------------
KEY_IN_USE = "An Idempotency-Key whose first request still runs: retry after `Retry-After` seconds."
IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
    OpenApiParameter.HEADER,
    description=(
        "Makes the request safe to retry: 1 to 255 visible ASCII characters (a random UUID), "
        "yours for SUPPORT_IDEMPOTENCY_TTL_SECONDS (24 h). A repeat with the same key and "
        "request answers the first answer (its status, body and ETag, refusals included) with "
        "`Idempotent-Replayed: true`, and changes nothing; with another request, 422; while "
        "the first still runs, 409 with `Retry-After`."
    ),
)
IF_MATCH = OpenApiParameter(
    "If-Match",
    str,
    OpenApiParameter.HEADER,
    description=(
        'The ticket\'s ETag as read (e.g. `"12.3"`; a list, or `*`): the write (or read) '
        "happens only at that version, else 412 with the current ETag."
    ),
)
IF_NONE_MATCH = OpenApiParameter(
    "If-None-Match",
    str,
    OpenApiParameter.HEADER,
    description=(
        "ETags the client has (or `*`). GET: 304 without a body while one is current. A "
        "write: 412 while one is current (`*`: always, the ticket exists)."
    ),
)
REPLAYED = OpenApiParameter(
    "Idempotent-Replayed",
    {"type": "string", "enum": ["true"]},
    OpenApiParameter.HEADER,
    response=True,
    description="Present on the stored answer of an earlier request with this Idempotency-Key.",
)


def etag_header(*codes: int) -> OpenApiParameter:
    return OpenApiParameter(
        "ETag",
        str,
        OpenApiParameter.HEADER,
        response=list(codes),
        description='The ticket\'s version: `"<id>.<version>"`, for If-Match and If-None-Match.',
    )


def keyed(responses: dict) -> dict:
    """``responses`` of a POST that takes an Idempotency-Key: with its 409 and 422."""
    responses = dict(responses)
    if 409 not in responses:
        responses[409] = OpenApiResponse(ErrorSerializer, description=KEY_IN_USE)
    responses[422] = OpenApiResponse(ErrorSerializer, description=ERROR_TEXT[422])
    if 400 not in responses:
        responses[400] = FIELD_ERRORS  # a malformed key
    return responses


# drf-spectacular names the path parameter "id" (SCHEMA_COERCE_PATH_PK); this types it.
ID_PATH = OpenApiParameter("id", OpenApiTypes.INT, OpenApiParameter.PATH)

PAGINATED_TICKETS = inline_serializer(
    "PaginatedTicketList",
    {
        "count": serializers.IntegerField(),
        "count_exact": serializers.BooleanField(
            help_text="False when `count` is the count limit and more tickets match."
        ),
        "next": serializers.URLField(allow_null=True),
        "previous": serializers.URLField(allow_null=True),
        "results": TicketSerializer(many=True),
    },
)

_ORDERING = [
    name
    for field in TicketFilter.base_filters["ordering"].param_map
    for name in (field, f"-{field}")
]
LIST_DESCRIPTION = (
    "Newest first unless `ordering` says otherwise. `count` is exact without a filter and with "
    "only `status`; with any other filter it counts at most SUPPORT_LIST_COUNT_LIMIT tickets "
    "(default 1000), and `count_exact` is false when more match. Pages: `page` numbers, or "
    "`cursor` (empty for the first page, then the `next` and `previous` links), which walks "
    "the default order at the same cost on any page. 400 when: `page=last` with an inexact "
    "count; `cursor` is not one the API gave, or comes with `page` or `ordering`; `search` "
    "has no 3 letters or digits in a row; any other value is invalid."
)
LIST_PARAMETERS = [
    OpenApiParameter(
        "page",
        OpenApiTypes.INT,
        description="Page number, from 1, or `last` (refused when the count is not exact).",
    ),
    OpenApiParameter(
        "cursor",
        str,
        description=(
            "Walk by position instead of page number: empty for the first page, then the "
            "`next`/`previous` links. Not with `page` or `ordering`."
        ),
    ),
    OpenApiParameter(
        "page_size", OpenApiTypes.INT, description="Tickets per page (default 20, at most 100)."
    ),
    OpenApiParameter("status", str, enum=STATUS_NAMES, many=True, description="Repeatable."),
    OpenApiParameter("priority", str, enum=PRIORITY_NAMES, many=True, description="Repeatable."),
    OpenApiParameter("assigned_to", OpenApiTypes.INT, description="The holder's user id."),
    OpenApiParameter(
        "search",
        str,
        description=(
            "Case-insensitive, in title or description; at least 3 letters or digits in a row "
            "(the search index finds runs of 3 characters)."
        ),
    ),
    OpenApiParameter(
        "ordering",
        str,
        enum=_ORDERING,
        description="Default -created_at. priority orders by rank (low < ... < urgent).",
    ),
]

# GET /api/events/ (support.api.events): one feed, two representations.
EVENTS_DESCRIPTION = (
    "The ticket history as it happens, in id order: every event for an admin; for an agent, "
    "the events of tickets it holds or held, from the one that gave it the ticket to the one "
    "that took it away. Only final events are served (no event can appear later below an id "
    "served), so going on from the last id got loses and repeats nothing.\n\n"
    "`Accept: text/event-stream`: Server-Sent Events, one per ticket event (`id:` the event's "
    "id, `event:` its kind, `data:` the event as JSON on one line), and a `: ping` comment every "
    "SUPPORT_EVENTS_HEARTBEAT_SECONDS (15). Starts after `Last-Event-ID`, else `after`, else "
    "now. The caller is checked again at every heartbeat: a revoked token ends the stream.\n\n"
    "Otherwise: a JSON page of the caller's events after `after`, at most `limit`; a page "
    "shorter than `limit` is the end for now. Without `after`: no events, and `next_after` "
    "is the feed's position now. 503 when transactions in flight keep the position unknown "
    "for a second."
)
EVENTS_PARAMETERS = [
    OpenApiParameter(
        "after",
        {"type": "integer", "minimum": 0, "maximum": 999_999_999_999_999_999},
        description="The last event id the client has: events after it (0: from the start).",
    ),
    OpenApiParameter(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": 1000},
        description="Events per JSON page (default 100, 1 to 1000); not used by the stream.",
    ),
    OpenApiParameter(
        "Last-Event-ID",
        str,
        OpenApiParameter.HEADER,
        description=(
            "Stream only (EventSource sends it when it reconnects): the last event id "
            "received; takes precedence over `after`."
        ),
    ),
]
EVENT_PAGE = inline_serializer(
    "EventPage",
    {
        "events": FeedEventSerializer(many=True),
        "next_after": serializers.IntegerField(
            help_text="`after` for the next page: the last event's id on a full page, else "
            "the feed's position (every event up to it is final)."
        ),
    },
)
EVENTS_RESPONSES = {
    (200, "application/json"): OpenApiResponse(
        EVENT_PAGE, description="A JSON page, or (text/event-stream) the stream."
    ),
    (200, "text/event-stream"): OpenApiResponse(
        OpenApiTypes.STR,
        description="Server-Sent Events: `id:`, `event:` (the kind), `data:` (the event's JSON).",
    ),
    **answers({}, 401, 403, field_errors=True),
}
