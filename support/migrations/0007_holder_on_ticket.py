"""The holder moves onto the ticket row: Ticket.assigned_to / assigned_at, copied from each
ticket's active assignment (0008 then adds the CHECK that a ticket is open exactly when it has
no agent, the index of what each agent holds, and drops the assignments' ``holding`` mirror;
a migration of its own, since PostgreSQL alters no table with this one's updates pending).
The assignment rows stay as the record.

Stop the workers of the older version before migrating: they write the holder only on the
assignment (the CHECK then refuses their changes) and read ``holding``, which is dropped.
"""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models
from django.db.models import OuterRef, Subquery


def holder_onto_tickets(apps, schema_editor):
    Ticket = apps.get_model("support", "Ticket")
    TicketAssignment = apps.get_model("support", "TicketAssignment")
    # an open ticket has no agent: an assignment left active on one is ended
    TicketAssignment.objects.filter(is_active=True, ticket__status="open").update(is_active=False)
    active = TicketAssignment.objects.filter(ticket_id=OuterRef("pk"), is_active=True)
    Ticket.objects.exclude(status="open").update(
        assigned_to_id=Subquery(active.values("agent_id")[:1]),
        assigned_at=Subquery(active.values("assigned_at")[:1]),
    )
    orphans = list(
        Ticket.objects.exclude(status="open")
        .filter(assigned_to__isnull=True)
        .values_list("pk", flat=True)[:20]
    )
    if orphans:
        raise RuntimeError(
            "tickets in status assigned, resolved or closed without an active assignment "
            f"(first ids: {orphans}): give each an agent or return it to open, then migrate"
        )


def holding_from_tickets(apps, schema_editor):
    TicketAssignment = apps.get_model("support", "TicketAssignment")
    TicketAssignment.objects.update(holding=False)
    TicketAssignment.objects.filter(is_active=True, ticket__status="assigned").update(holding=True)


class Migration(migrations.Migration):
    dependencies = [
        ("support", "0006_assignment_holding"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name="ticket",
            name="assigned_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="ticket",
            name="assigned_to",
            field=models.ForeignKey(
                blank=True,
                db_index=False,
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="held_tickets",
                to=settings.AUTH_USER_MODEL,
            ),
        ),
        migrations.RunPython(holder_onto_tickets, holding_from_tickets),
    ]
