"""Query-string filters of the admin ticket list (django-filter validates: 400 on bad input)."""

import django_filters
from django import forms
from django.core.exceptions import ValidationError
from django.db.models import Q

from support.api.serializers import MAX_USER_ID, PRIORITY_NAMES, PRIORITY_RANK
from support.models import Ticket


class IntegerFilter(django_filters.Filter):
    field_class = forms.IntegerField


SEARCH_MIN_RUN = 3
SEARCH_TOO_SHORT = (
    f"Search for at least {SEARCH_MIN_RUN} letters or digits in a row: a shorter term cannot"
    " use the search index (it looks tickets up by runs of 3 characters)."
)


def searchable(term: str) -> None:
    """The search index (pg_trgm, migration 0010) finds a term by its trigrams; a term without
    3 letters or digits in a row may have none, and would read every ticket."""
    run = 0
    for char in term:
        run = run + 1 if char.isalpha() or char.isdecimal() else 0
        if run >= SEARCH_MIN_RUN:
            return
    raise ValidationError(SEARCH_TOO_SHORT, code="min_length")


class TicketFilter(django_filters.FilterSet):
    # distinct=False: these filter columns of the ticket itself, so rows cannot repeat.
    status = django_filters.MultipleChoiceFilter(choices=Ticket.Status.choices, distinct=False)
    priority = django_filters.MultipleChoiceFilter(
        choices=[(name, name) for name in PRIORITY_NAMES],
        method="filter_priority",
        distinct=False,
    )
    assigned_to = IntegerFilter(min_value=1, max_value=MAX_USER_ID, field_name="assigned_to_id")
    search = django_filters.CharFilter(
        max_length=200, method="filter_search", validators=[searchable]
    )
    ordering = django_filters.OrderingFilter(
        fields=("created_at", "updated_at", "priority", "status", "id", "title"),
    )

    class Meta:
        model = Ticket
        fields = []

    # Filters that narrow the list by more than status: its count is then bounded, not exact.
    NARROWING = ("priority", "assigned_to", "search")

    def statuses(self) -> list[str]:
        """The statuses asked for (none: every status); after is_valid()."""
        return list(self.form.cleaned_data.get("status") or [])

    def narrowed(self) -> bool:
        """Whether a filter other than status is in use; after is_valid()."""
        return any(
            self.form.cleaned_data.get(name) not in (None, "", []) for name in self.NARROWING
        )

    def filter_priority(self, queryset, name, value):
        return queryset.filter(priority__in=[PRIORITY_RANK[v] for v in value])

    def filter_search(self, queryset, name, value):
        return queryset.filter(Q(title__icontains=value) | Q(description__icontains=value))

    @property
    def qs(self):
        queryset = super().qs
        ordering = self.form.cleaned_data.get("ordering") if self.is_bound else None
        if ordering:
            # Ties broken by id so that pages never skip or repeat a ticket.
            return queryset.order_by(*queryset.query.order_by, "-id")
        return queryset.order_by("-created_at", "-id")
