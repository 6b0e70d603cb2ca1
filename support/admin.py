"""The Django admin site: tickets, their assignments and history, and the agents.

Every change made here goes through ``support.services``, as the API's do, so the cap and the
rules hold and every change leaves its TicketEvent:

- A ticket's change form applies the edit by calling ``services.ticket_update`` as the last step
  of its validation (``TicketChangeForm._post_clean``); a refusal becomes a form error and, since
  the service runs in its own transaction, changes nothing. ``save_model`` then has nothing left
  to save. The add form's ``save_model`` calls ``services.ticket_create``; deletions call
  ``services.ticket_delete``; the "Return to pool" action calls ``services.ticket_update``.
- Django wraps a change form's and a delete page's POST in ``transaction.atomic()``. The ticket
  views here run without it: each service call is then its own short transaction, committed (or
  refused) before the page answers, and holds its agent and ticket locks no longer than the
  API's calls do.
- Assignments and events are read-only here: they are written by the services only.
- Unticking "active" on an agent in the user admin calls ``services.agent_deactivate``, which
  returns the agent's assigned tickets to the pool in the same transaction.
"""

import contextlib

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.options import csrf_protect_m
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.forms import UserChangeForm as DjangoUserChangeForm
from django.db import IntegrityError
from django.db.models import F, Q
from django.forms.models import BaseInlineFormSet
from django.http import HttpResponseRedirect
from django.urls import reverse

from support import services
from support.models import Ticket, TicketAssignment, TicketEvent

User = get_user_model()
Status = Ticket.Status

CONCURRENT_CONFLICT = "A concurrent change conflicted with this one; try again."


# --- Tickets ---------------------------------------------------------------------------------
class AgentChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, obj):
        cap = settings.SUPPORT_AGENT_MAX_TICKETS
        suffix = "" if obj.is_active else ", inactive"
        return f"{obj.username} ({obj.load}/{cap} assigned{suffix})"


def agent_choices(*, holder_id: int | None):
    """Active agents with their load, and the current holder even if no longer one (a resolved
    or closed ticket keeps a deactivated agent as its record), so an untouched field validates."""
    return (
        User.objects.annotate(is_agent=services.is_agent_expr(), load=services.held_count())
        .filter(Q(is_active=True, is_agent=True) | Q(pk=holder_id))
        .order_by("username")
    )


class TicketAddForm(forms.ModelForm):
    """A new ticket: title, description, priority. It starts in the pool (``open``)."""

    class Meta:
        model = Ticket
        fields = ("title", "description", "priority")


class TicketChangeForm(forms.ModelForm):
    """An admin's edit, applied through ``services.ticket_update`` during validation.

    Only the fields the admin changed are sent, as a PATCH would: every field carries its value
    from when the page was rendered (``show_hidden_initial``), so a form opened before an agent
    took the ticket does not silently hand it back to the pool when only the title is edited.
    """

    assigned_to = AgentChoiceField(
        queryset=User.objects.none(),
        required=False,
        label="Assigned to",
        empty_label="— nobody (the ticket is in the pool) —",
        help_text=(
            "Giving an agent to an open ticket makes it assigned; choosing nobody returns it to"
            " the pool. The cap of assigned tickets per agent applies."
        ),
    )

    actor_id: int | None = None  # the admin making the change, set by TicketAdmin.get_form

    class Meta:
        model = Ticket
        fields = ("title", "description", "priority", "status")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        holder_id = getattr(self.instance, "holder_id", None)
        self.initial.setdefault("assigned_to", holder_id)
        if "assigned_to" in self.fields:
            self.fields["assigned_to"].queryset = agent_choices(holder_id=holder_id)
        for field in self.fields.values():
            field.show_hidden_initial = True

    def _get_validation_exclusions(self):
        # Status and holder are the service's to judge, together (the model's CHECK would see
        # them half-built on the form's copy of the ticket).
        return {*super()._get_validation_exclusions(), "status", "assigned_to", "assigned_at"}

    def _post_clean(self):
        # After the model's own validation, so that nothing can turn the form invalid once the
        # service has applied the change.
        super()._post_clean()
        if self._errors:
            return
        changes = {name: self.cleaned_data[name] for name in self.changed_data}
        if "assigned_to" in changes:
            agent = changes["assigned_to"]
            changes["assigned_to"] = agent.pk if agent is not None else None
        if not changes:
            return
        try:
            row = services.ticket_update(
                ticket_id=self.instance.pk, changes=changes, actor_id=self.actor_id
            )
        except services.InvalidField as exc:
            self.add_error(exc.field if exc.field in self.fields else None, exc.detail)
            return
        except services.ServiceError as exc:  # Conflict, AgentAtCapacity, NotFound, ...
            self.add_error(None, exc.detail)
            return
        except IntegrityError:
            # The database's constraints decided a race the services did not foresee.
            self.add_error(None, CONCURRENT_CONFLICT)
            return
        for name in ("title", "description", "priority", "status", "updated_at"):
            setattr(self.instance, name, row[name])


class ViewOnlyInlineFormSet(BaseInlineFormSet):
    """The formset of a read-only inline: nothing is submitted through it, so nothing in it can
    fail validation after the ticket's form applied its change, and it never saves."""

    def is_valid(self):
        return True

    def save(self, commit=True):
        self.new_objects, self.changed_objects, self.deleted_objects = [], [], []
        return []


class ReadOnlyInline(admin.TabularInline):
    formset = ViewOnlyInlineFormSet
    extra = 0
    max_num = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class TicketEventInline(ReadOnlyInline):
    model = TicketEvent
    verbose_name = "history event"
    verbose_name_plural = "history (oldest first)"
    fields = ("at", "kind", "actor", "from_status", "to_status", "agent", "changes")
    readonly_fields = fields
    ordering = ("id",)

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("actor", "agent")


class TicketAssignmentInline(ReadOnlyInline):
    model = TicketAssignment
    verbose_name_plural = "assignments"
    fields = ("agent", "assigned_at", "is_active")
    readonly_fields = fields
    ordering = ("assigned_at", "id")

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("agent")


class HolderFilter(admin.SimpleListFilter):
    """Tickets by the agent actively holding them (any status), or those in the pool."""

    title = "agent"
    parameter_name = "agent"
    POOL = "none"

    def lookups(self, request, model_admin):
        agents = (
            User.objects.filter(services.is_agent_expr())
            .order_by("username")
            .values_list("pk", "username")
        )
        return [(self.POOL, "nobody (in the pool)")] + [(str(pk), name) for pk, name in agents]

    def queryset(self, request, queryset):
        value = self.value()
        if value is None:
            return queryset
        if value == self.POOL:
            return queryset.filter(status="open")  # no agent: the pool (ticket_pool_idx)
        if not (value.isascii() and value.isdigit() and len(value) <= 18):
            return queryset.none()
        return queryset.filter(assigned_to_id=int(value))


@admin.register(Ticket)
class TicketAdmin(admin.ModelAdmin):
    form = TicketChangeForm
    add_form = TicketAddForm
    list_display = (
        "id",
        "title",
        "status",
        "priority_name",
        "holder",
        "created_at",
        "updated_at",
    )
    list_display_links = ("id", "title")
    list_filter = ("status", "priority", HolderFilter)
    search_fields = ("title", "description")
    ordering = ("-created_at", "-id")
    list_per_page = 50
    actions = ("return_to_pool",)
    readonly_fields = ("assigned_at", "created_by", "created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("title", "description", "priority")}),
        ("Status and holder", {"fields": ("status", "assigned_to", "assigned_at")}),
        ("Record", {"fields": ("created_by", "created_at", "updated_at")}),
    )
    add_fieldsets = ((None, {"fields": ("title", "description", "priority")}),)
    inlines = (TicketAssignmentInline, TicketEventInline)

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(holder_id=F("assigned_to_id"), holder_name=F("assigned_to__username"))
            .select_related("created_by")
        )

    @admin.display(description="priority", ordering="priority")
    def priority_name(self, obj):
        return obj.get_priority_display()

    @admin.display(description="agent", ordering="holder_name", empty_value="—")
    def holder(self, obj):
        return obj.holder_name

    # --- Forms ---------------------------------------------------------------------------
    def get_fieldsets(self, request, obj=None):
        return self.fieldsets if obj is not None else self.add_fieldsets

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields if obj is not None else ()

    def get_inlines(self, request, obj):
        return self.inlines if obj is not None else ()

    def get_form(self, request, obj=None, change=False, **kwargs):
        kwargs.setdefault("form", self.form if obj is not None else self.add_form)
        form = super().get_form(request, obj, change=change, **kwargs)
        form.actor_id = request.user.pk  # a fresh class per call: safe to set
        return form

    @csrf_protect_m
    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        # Without Django's transaction.atomic() around the POST: see the module docstring.
        return self._changeform_view(request, object_id, form_url, extra_context)

    def save_model(self, request, obj, form, change):
        if change:
            return  # applied by TicketChangeForm through services.ticket_update
        row = services.ticket_create(
            title=form.cleaned_data["title"],
            description=form.cleaned_data["description"],
            priority=form.cleaned_data["priority"],
            created_by_id=request.user.pk,
        )
        for name in services.ROW_FIELDS:
            setattr(obj, "pk" if name == "id" else name, row[name])
        obj._state.adding = False
        obj._state.db = "default"

    # --- Deletion ------------------------------------------------------------------------
    @csrf_protect_m
    def delete_view(self, request, object_id, extra_context=None):
        # Without Django's transaction.atomic() around the POST: see the module docstring.
        return self._delete_view(request, object_id, extra_context)

    def get_deleted_objects(self, objs, request):
        deleted, model_count, perms_needed, protected = super().get_deleted_objects(objs, request)
        # ticket_delete removes a ticket's assignments with it; deleting an assignment directly
        # stays forbidden, so its permission is not needed here.
        perms_needed.discard(str(TicketAssignment._meta.verbose_name))
        return deleted, model_count, perms_needed, protected

    def log_deletions(self, request, queryset):
        pass  # logged by _delete after the service deleted the ticket, not before

    def _delete(self, request, obj) -> bool:
        try:
            services.ticket_delete(ticket_id=obj.pk, actor_id=request.user.pk)
        except services.NotFound:
            return True  # deleted meanwhile: what was asked for holds
        except (services.ServiceError, IntegrityError) as exc:
            detail = getattr(exc, "detail", CONCURRENT_CONFLICT)
            self.message_user(request, f"{obj} was not deleted: {detail}", messages.ERROR)
            return False
        super().log_deletions(request, [obj])
        return True

    def delete_model(self, request, obj):
        if not self._delete(request, obj):
            request.ticket_delete_refused = True

    def response_delete(self, request, obj_display, obj_id):
        if getattr(request, "ticket_delete_refused", False):
            return HttpResponseRedirect(reverse("admin:support_ticket_changelist"))
        return super().response_delete(request, obj_display, obj_id)

    def delete_queryset(self, request, queryset):
        for ticket in queryset:
            self._delete(request, ticket)

    # --- Actions -------------------------------------------------------------------------
    @admin.action(description="Return to pool", permissions=["change"])
    def return_to_pool(self, request, queryset):
        """End each selected ticket's assignment and make it ``open`` again."""
        returned = 0
        for ticket in queryset.exclude(status=Status.OPEN):
            try:
                services.ticket_update(
                    ticket_id=ticket.pk, changes={"assigned_to": None}, actor_id=request.user.pk
                )
            except services.NotFound:
                continue
            except (services.ServiceError, IntegrityError) as exc:
                detail = getattr(exc, "detail", CONCURRENT_CONFLICT)
                self.message_user(request, f"{ticket}: {detail}", messages.ERROR)
                continue
            returned += 1
        self.message_user(request, f"Returned {returned} ticket(s) to the pool.", messages.SUCCESS)


# --- Assignments and history: read-only -------------------------------------------------------
class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(TicketAssignment)
class TicketAssignmentAdmin(ReadOnlyAdmin):
    list_display = ("id", "ticket", "agent", "assigned_at", "is_active")
    list_filter = ("is_active",)
    list_select_related = ("ticket", "agent")
    search_fields = ("ticket__title", "agent__username")
    ordering = ("-assigned_at", "-id")


@admin.register(TicketEvent)
class TicketEventAdmin(ReadOnlyAdmin):
    list_display = ("id", "ticket_ref", "at", "kind", "actor", "from_status", "to_status", "agent")
    list_filter = ("kind",)
    list_select_related = ("actor", "agent")
    search_fields = ("actor__username", "agent__username")
    ordering = ("-id",)

    @admin.display(description="ticket", ordering="ticket_id")
    def ticket_ref(self, obj):
        # Events outlive their ticket: show the id, never load the (maybe deleted) row.
        return f"#{obj.ticket_id}"


# --- Users and agents ----------------------------------------------------------------------
class AgentFilter(admin.SimpleListFilter):
    title = "agent"
    parameter_name = "agent"

    def lookups(self, request, model_admin):
        return (("yes", "Agents"), ("no", "Not agents"))

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(services.is_agent_expr())
        if self.value() == "no":
            return queryset.filter(~services.is_agent_expr())
        return queryset


class UserChangeForm(DjangoUserChangeForm):
    """Django's, refusing a username another user holds in another case, as Django's add form
    and the API do (with "alice" taken, "Alice" is refused)."""

    def clean_username(self):
        username = self.cleaned_data.get("username")
        others = User.objects.exclude(pk=self.instance.pk)
        if username and others.filter(username__iexact=username).exists():
            raise forms.ValidationError(self.instance.unique_error_message(User, ["username"]))
        return username


admin.site.unregister(User)


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    """Django's user admin, with agents in view, and deactivation through the service."""

    form = UserChangeForm
    list_display = ("username", "email", "is_staff", "is_active", "is_agent", "assigned_count")
    list_filter = (AgentFilter, "is_staff", "is_superuser", "is_active", "groups")
    actions = ("deactivate_agents",)

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                _is_agent=services.is_agent_expr(),
                _assigned_count=services.held_count(),
            )
        )

    @admin.display(description="agent", boolean=True, ordering="_is_agent")
    def is_agent(self, obj):
        return obj._is_agent

    @admin.display(description="assigned tickets", ordering="_assigned_count")
    def assigned_count(self, obj):
        return obj._assigned_count if obj._is_agent else None

    def save_related(self, request, form, formsets, change):
        was_agent = (
            change and form.instance.groups.filter(name=settings.SUPPORT_AGENTS_GROUP).exists()
        )
        super().save_related(request, form, formsets, change)
        still_agent = form.instance.groups.filter(name=settings.SUPPORT_AGENTS_GROUP).exists()
        if was_agent and not still_agent:
            # Leaving the agents group: the tickets it holds in assigned go back to the pool,
            # in this page's transaction (a fetch racing it waits on the row lock, then is 403).
            services.agent_release_tickets(agent_id=form.instance.pk, actor_id=request.user.pk)

    def save_model(self, request, obj, form, change):
        deactivating = change and "is_active" in form.changed_data and not obj.is_active
        super().save_model(request, obj, form, change)
        if deactivating and obj.groups.filter(name=settings.SUPPORT_AGENTS_GROUP).exists():
            # After the save, which locks the user's row (a rename too), so that the service's
            # ticket write comes after it, as the lock contract wants (support.services.locks).
            # It returns the agent's assigned tickets to the pool and deletes its tokens, in
            # this page's transaction. NotFound: it left the agents group meanwhile, an
            # ordinary deactivation then.
            with contextlib.suppress(services.NotFound):
                services.agent_deactivate(agent_id=obj.pk, actor_id=request.user.pk)

    @admin.action(
        description="Deactivate selected agents (their tickets return to the pool)",
        permissions=["change"],
    )
    def deactivate_agents(self, request, queryset):
        done = 0
        for user in queryset.filter(services.is_agent_expr(), is_active=True):
            try:
                services.agent_deactivate(agent_id=user.pk, actor_id=request.user.pk)
            except services.NotFound:
                continue
            done += 1
        self.message_user(request, f"Deactivated {done} agent(s).", messages.SUCCESS)
