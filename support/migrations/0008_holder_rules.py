"""The rules on the ticket row (see 0007): open exactly when no agent, what each agent holds
indexed in answer order; the assignments' ``holding`` mirror and its index go."""

from django.conf import settings
from django.db import migrations, models
from django.db.models import Q


class Migration(migrations.Migration):
    dependencies = [
        ("support", "0007_holder_on_ticket"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddConstraint(
            model_name="ticket",
            constraint=models.CheckConstraint(
                condition=Q(status="open", assigned_to__isnull=True, assigned_at__isnull=True)
                | (~Q(status="open") & Q(assigned_to__isnull=False, assigned_at__isnull=False)),
                name="ticket_open_iff_no_agent",
            ),
        ),
        migrations.AddIndex(
            model_name="ticket",
            index=models.Index(
                condition=Q(status="assigned"),
                fields=["assigned_to", "assigned_at", "id"],
                name="ticket_held_idx",
            ),
        ),
        migrations.RemoveIndex(
            model_name="ticketassignment",
            name="assignment_agent_holding_idx",
        ),
        migrations.RemoveField(model_name="ticketassignment", name="holding"),
    ]
