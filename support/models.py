"""Tickets and their assignments, with the constraints and indexes the rules depend on."""

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from support import rules


class Ticket(models.Model):
    # The statuses of support.rules, where the moves between them are.
    Status = models.TextChoices("Status", [(s.name, s.value) for s in rules.Status])

    class Priority(models.IntegerChoices):
        # Stored as a rank so that "highest first" is a plain index order.
        LOW = 0, "low"
        NORMAL = 1, "normal"
        HIGH = 2, "high"
        URGENT = 3, "urgent"

    title = models.CharField(max_length=200)
    description = models.TextField(blank=True, default="", max_length=10_000)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.OPEN)
    priority = models.PositiveSmallIntegerField(choices=Priority.choices, default=Priority.NORMAL)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="created_tickets"
    )
    # The holder: the agent working the ticket (assigned), or who worked it (resolved, closed);
    # none while it is open, in the pool. Written with the ticket's status in one UPDATE by
    # support.services.records, which also keeps the ticket's assignment record.
    assigned_to = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="held_tickets",
        # No index of all an agent's tickets: with one, stale statistics let the planner read
        # an agent's whole history for "what do I hold" instead of ticket_held_idx.
        db_index=False,
    )
    assigned_at = models.DateTimeField(null=True, blank=True)
    # Counts the ticket's changes: 1 at creation, one more with every write of the row (every
    # write goes through support.services.records.change_tickets, which adds it in the same
    # UPDATE). The API's ETag is made from it (support.api.conditional).
    version = models.BigIntegerField(default=1, db_default=1, editable=False)

    class Meta:
        indexes = [
            # The pool: open tickets in pick order (priority desc, then oldest).
            models.Index(
                fields=["-priority", "created_at", "id"],
                condition=Q(status="open"),
                name="ticket_pool_idx",
            ),
            # What an agent holds (counts toward its cap), in answer order; its resolved and
            # closed tickets are not in it, however many.
            models.Index(
                fields=["assigned_to", "assigned_at", "id"],
                condition=Q(status="assigned"),
                name="ticket_held_idx",
            ),
            # The admin list's default order, and its status filter.
            models.Index(fields=["-created_at", "-id"], name="ticket_newest_idx"),
            models.Index(fields=["status", "-created_at"], name="ticket_status_idx"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=["open", "assigned", "resolved", "closed"]),
                name="ticket_status_valid",
            ),
            models.CheckConstraint(condition=Q(priority__lte=3), name="ticket_priority_valid"),
            # support.rules: a ticket is open exactly when it has no agent.
            models.CheckConstraint(
                condition=(
                    Q(status="open", assigned_to__isnull=True, assigned_at__isnull=True)
                    | (~Q(status="open") & Q(assigned_to__isnull=False, assigned_at__isnull=False))
                ),
                name="ticket_open_iff_no_agent",
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.title}"


class TicketAssignment(models.Model):
    """The record of every assignment: who was given a ticket, when, and whether it still holds
    it. Written with every change of holder (support.services.records), never read on the hot
    paths, which read the holder from the ticket row. At most one row per ticket is active,
    and it names the ticket's ``assigned_to``."""

    ticket = models.ForeignKey(Ticket, on_delete=models.CASCADE, related_name="assignments")
    agent = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        related_name="ticket_assignments",
        # Written with every fetch, never read on a hot path: no index to keep up.
        db_index=False,
    )
    assigned_at = models.DateTimeField(default=timezone.now)
    is_active = models.BooleanField(default=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["ticket"],
                condition=Q(is_active=True),
                name="one_active_assignment_per_ticket",
            ),
        ]

    def __str__(self) -> str:
        state = "active" if self.is_active else "ended"
        return f"ticket {self.ticket_id} -> agent {self.agent_id} ({state})"


class TicketEvent(models.Model):
    """One change of a ticket, written in the same transaction as the change.

    Events outlive their ticket: ``ticket`` carries no database constraint, and a deletion is
    itself an event.
    """

    class Kind(models.TextChoices):
        CREATED = "created"
        ASSIGNED = "assigned"  # taken by an agent's fetch, or given by an admin
        REASSIGNED = "reassigned"
        RELEASED = "released"  # back to the pool
        STATUS_CHANGED = "status_changed"
        EDITED = "edited"  # title, description or priority
        DELETED = "deleted"

    class Reason(models.TextChoices):
        """Why a ticket went back to the pool, when the service or the agent sent it there:
        ``changes["reason"]`` of a ``released`` event (an admin's release and a deactivation
        carry none)."""

        AGENT_IDLE = "agent_idle"  # its agent was silent too long
        RELEASED_BY_AGENT = "released_by_agent"  # handed back by its agent

    ticket = models.ForeignKey(
        Ticket,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        db_index=False,  # event_ticket_idx covers it
        related_name="events",
    )
    at = models.DateTimeField(default=timezone.now)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="ticket_actions"
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    from_status = models.CharField(max_length=8, blank=True, default="")
    to_status = models.CharField(max_length=8, blank=True, default="")
    # The ticket's agent after the event, or before it when the event took the ticket from its
    # agent (a release, a deletion); none for a ticket in the pool.
    agent = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="ticket_events",
        db_index=False,  # event_agent_idx covers it
    )
    # The ticket's agent before the event when that is another agent than ``agent``: the one a
    # reassignment took the ticket from. With ``agent``, the agents who see the event in the
    # event feed (support.services.events). Written by support.services.records.record from
    # ``changes["assigned_to"]``. No constraint: that agent is ``agent`` of an earlier event.
    previous_agent = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        db_index=False,  # event_previous_agent_idx, partial
        null=True,
        blank=True,
        related_name="+",
    )
    # {"field": [old, new]} in the API's terms (priority by name, assigned_to by user id);
    # a release may add {"reason": <Reason>}.
    changes = models.JSONField(default=dict, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["ticket", "id"], name="event_ticket_idx"),
            # An agent's events in feed order (support.services.events.visible_events).
            models.Index(fields=["agent", "id"], name="event_agent_idx"),
            models.Index(
                fields=["previous_agent", "id"],
                condition=Q(previous_agent__isnull=False),
                name="event_previous_agent_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"ticket {self.ticket_id}: {self.kind} at {self.at:%Y-%m-%d %H:%M:%S}"


class ApiToken(models.Model):
    """An API token. Only the SHA-256 of its key is stored: the key is shown once, at login.

    Keys are 160 random bits, so a fast hash is enough (nothing to brute-force); a database
    leak yields no usable token.
    """

    key_hash = models.CharField(max_length=64, unique=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"token of user {self.user_id}, expires {self.expires_at:%Y-%m-%d %H:%M}"


class AgentPresence(models.Model):
    """When an agent was last seen making a request (support.presence).

    Written in batches, not per request: each worker process keeps its agents' latest request
    times in memory and writes them in one upsert per flush interval
    (SUPPORT_PRESENCE_FLUSH_SECONDS), so an agent costs at most one write per interval per
    process, and this row may lag its latest request by that much. Read by the idle release
    (support.services.idle_release). Outside the lock contract: only a flush locks its rows,
    for one statement.
    """

    agent = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        primary_key=True,
        related_name="presence",
    )
    last_seen = models.DateTimeField()

    class Meta:
        db_table = "support_agent_presence"

    def __str__(self) -> str:
        return f"agent {self.agent_id} last seen {self.last_seen:%Y-%m-%d %H:%M:%S}"


class IdempotencyKey(models.Model):
    """A POST made with an ``Idempotency-Key``, and the answer it got (support.api.idempotency).

    Written in the transaction of the request's effect, after it, so the effect and its record
    commit together or not at all; kept until ``expires_at`` (SUPPORT_IDEMPOTENCY_TTL_SECONDS),
    then removed by the housekeeping task or ``manage.py purge_idempotency_keys``. A key is one
    user's: another user's same key is another request.
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="+",
        db_index=False,  # idempotency_key_per_user covers it
    )
    key = models.CharField(max_length=255)
    # SHA-256 of what makes the request this request: method, path, If-Match, the body
    fingerprint = models.CharField(max_length=64)
    status = models.PositiveSmallIntegerField()
    body = models.TextField(blank=True)  # the answer's JSON as sent ("": no body)
    headers = models.JSONField(default=dict)  # the answer's headers to replay (ETag)
    # The logout's token, by its hash: the token is gone when the logout is retried, and this
    # is how the retry is known to be its caller's (support.api.login).
    credential = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()

    class Meta:
        db_table = "support_idempotency_key"
        constraints = [
            models.UniqueConstraint(fields=["user", "key"], name="idempotency_key_per_user"),
        ]
        indexes = [
            models.Index(fields=["expires_at"], name="idempotency_expiry_idx"),
            models.Index(
                fields=["credential"],
                condition=~Q(credential=""),
                name="idempotency_credential_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"key {self.key!r} of user {self.user_id}: {self.status}"
