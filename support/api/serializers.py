"""Shapes and validation of the API's bodies and queries. No rules here (see support.services)."""

from decimal import Decimal

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from support import rules
from support.models import Ticket, TicketEvent

PRIORITY_NAMES = [label for _, label in Ticket.Priority.choices]  # low, normal, high, urgent
PRIORITY_RANK = {label: rank for rank, label in Ticket.Priority.choices}
PRIORITY_NAME = {rank: label for rank, label in Ticket.Priority.choices}
STATUS_NAMES = list(rules.STATUSES)

# Ticket ids are 64-bit, user ids 32-bit: larger numbers are input errors, not lookups.
MAX_TICKET_ID = 2**63 - 1
MAX_USER_ID = 2**31 - 1


def _iso(value):
    # The same text DRF's DateTimeField writes for an aware UTC datetime.
    if value is None:
        return None
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


class TicketSerializer(serializers.Serializer):
    """The ticket as the API shows it, built from a row of ``services.ticket_rows``.

    The fields describe the shape; ``to_representation`` writes the row directly, since a
    field-by-field pass costs more per ticket than the whole database read.
    """

    id = serializers.IntegerField(read_only=True)
    title = serializers.CharField(read_only=True)
    description = serializers.CharField(read_only=True)
    status = serializers.ChoiceField(choices=STATUS_NAMES, read_only=True)
    priority = serializers.ChoiceField(choices=PRIORITY_NAMES, read_only=True)
    created_by = serializers.IntegerField(read_only=True)
    assigned_to = serializers.IntegerField(read_only=True, allow_null=True)
    assigned_at = serializers.DateTimeField(read_only=True, allow_null=True)
    created_at = serializers.DateTimeField(read_only=True)
    updated_at = serializers.DateTimeField(read_only=True)
    version = serializers.IntegerField(
        read_only=True,
        help_text="Goes up with every change of the ticket; the ETag is made from it.",
    )

    def to_representation(self, row):
        return {
            "id": row["id"],
            "title": row["title"],
            "description": row["description"],
            "status": row["status"],
            "priority": PRIORITY_NAME[row["priority"]],
            "created_by": row["created_by_id"],
            "assigned_to": row["assigned_to_id"],
            "assigned_at": _iso(row["assigned_at"]),
            "created_at": _iso(row["created_at"]),
            "updated_at": _iso(row["updated_at"]),
            "version": row["version"],
        }


@extend_schema_field(
    {
        "type": "object",
        "description": (
            "field: [old, new] for each changed field; a release by the service or by the "
            "agent also says why, in `reason`."
        ),
        "properties": {"reason": {"type": "string", "enum": TicketEvent.Reason.values}},
        "additionalProperties": {"type": "array", "items": {}},
    }
)
class EventChangesField(serializers.DictField):
    """An event's ``changes``: ``{"field": [old, new]}``, and ``reason`` on some releases."""


class TicketEventSerializer(serializers.Serializer):
    """One entry of a ticket's history, from a row of ``services.ticket_history``."""

    id = serializers.IntegerField(read_only=True)
    at = serializers.DateTimeField(read_only=True)
    actor = serializers.IntegerField(read_only=True)
    kind = serializers.ChoiceField(choices=TicketEvent.Kind.values, read_only=True)
    from_status = serializers.ChoiceField(choices=STATUS_NAMES, read_only=True, allow_null=True)
    to_status = serializers.ChoiceField(choices=STATUS_NAMES, read_only=True, allow_null=True)
    agent = serializers.IntegerField(read_only=True, allow_null=True)
    changes = EventChangesField(read_only=True)

    def to_representation(self, row):
        return {
            "id": row["id"],
            "at": _iso(row["at"]),
            "actor": row["actor_id"],
            "kind": row["kind"],
            "from_status": row["from_status"] or None,
            "to_status": row["to_status"] or None,
            "agent": row["agent_id"],
            "changes": row["changes"],
        }


class FeedEventSerializer(TicketEventSerializer):
    """One event of the feed (``GET /api/events/``): a history entry, with its ticket."""

    ticket = serializers.IntegerField(read_only=True, help_text="The ticket's id.")

    def to_representation(self, row):
        entry = super().to_representation(row)
        return {"id": entry.pop("id"), "ticket": row["ticket_id"], **entry}


def event_json(row: dict) -> dict:
    """A feed event as the API shows it, from a row of support.services.events."""
    return FeedEventSerializer().to_representation(row)


def ticket_json(row: dict) -> dict:
    return TicketSerializer().to_representation(row)


# --- Strict fields: a value of the wrong JSON type is refused, never converted ----------------
# DRF's own fields coerce: CharField turns 5 and 1.5 into "5" and "1.5", IntegerField takes
# "11" and 14.0, BooleanField "yes" and 1. A body here must carry each value as its JSON type.
class StrictCharField(serializers.CharField):
    """A JSON string only."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictEmailField(StrictCharField, serializers.EmailField):
    """An email address, as a JSON string only."""


class StrictChoiceField(serializers.ChoiceField):
    """One of the choices, as a JSON string only."""

    default_error_messages = {"invalid": "Not a valid string."}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer only: not "11", not 14.0, not true."""

    def to_internal_value(self, data):
        if not isinstance(data, int) or isinstance(data, bool):
            self.fail("invalid")
        return data  # min_value / max_value are validators: they run after this


class StrictBooleanField(serializers.BooleanField):
    """JSON true or false only: not "true", not 1."""

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


class PriorityField(StrictChoiceField):
    """A priority by name on the wire, its rank in the database."""

    def __init__(self, **kwargs):
        super().__init__(choices=PRIORITY_NAMES, **kwargs)

    def to_internal_value(self, data):
        return PRIORITY_RANK[super().to_internal_value(data)]


class TicketCreateSerializer(serializers.Serializer):
    title = StrictCharField(max_length=200)
    description = StrictCharField(max_length=10_000, required=False, allow_blank=True, default="")
    priority = PriorityField(required=False, help_text="Default: normal.")

    def validate(self, attrs):
        attrs.setdefault("priority", Ticket.Priority.NORMAL.value)  # stored as its rank
        return attrs


class TicketUpdateSerializer(serializers.Serializer):
    """PUT replaces every writable field (all required); PATCH (partial) any subset."""

    title = StrictCharField(max_length=200)
    description = StrictCharField(max_length=10_000, allow_blank=True)
    priority = PriorityField()
    status = StrictChoiceField(choices=STATUS_NAMES)
    assigned_to = StrictIntegerField(allow_null=True, min_value=1, max_value=MAX_USER_ID)


class AgentTransitionSerializer(serializers.Serializer):
    ticket_id = StrictIntegerField(min_value=1, max_value=MAX_TICKET_ID)
    status = StrictChoiceField(choices=list(rules.AGENT_TARGETS))

    def well_formed_ticket_id(self) -> int | None:
        """After ``is_valid()`` failed: the body's ticket_id if it alone is well-formed."""
        data = self.initial_data
        if not isinstance(data, dict) or "ticket_id" in self.errors:
            return None
        return data["ticket_id"]


class AgentFetchQuerySerializer(serializers.Serializer):
    """The fetch's query: ``wait``, the seconds to wait for work when the agent holds nothing."""

    wait = serializers.DecimalField(
        max_digits=5,
        decimal_places=3,
        min_value=Decimal("0.001"),
        max_value=settings.SUPPORT_WAIT_MAX_SECONDS,
    )


class AgentSerializer(serializers.Serializer):
    id = serializers.IntegerField(read_only=True)
    username = serializers.CharField(read_only=True)
    email = serializers.CharField(read_only=True, help_text="An email address, or empty.")
    is_active = serializers.BooleanField(read_only=True)
    assigned_count = serializers.IntegerField(read_only=True)


class AgentCreateSerializer(serializers.Serializer):
    username = StrictCharField(
        max_length=150,
        validators=[UnicodeUsernameValidator()],
        help_text="Unique regardless of case: with alice taken, Alice is refused.",
    )
    password = StrictCharField(max_length=128, write_only=True, trim_whitespace=False)
    email = StrictEmailField(required=False, allow_blank=True)

    def validate(self, attrs):
        candidate = get_user_model()(username=attrs["username"], email=attrs.get("email", ""))
        try:
            validate_password(attrs["password"], user=candidate)
        except DjangoValidationError as exc:
            raise serializers.ValidationError({"password": list(exc.messages)}) from None
        return attrs


class AgentUpdateSerializer(serializers.Serializer):
    is_active = StrictBooleanField(
        help_text="false deactivates the agent (as DELETE does); true reactivates it."
    )


class TokenRequestSerializer(serializers.Serializer):
    username = StrictCharField(max_length=150)
    password = StrictCharField(max_length=128, trim_whitespace=False)
