"""When each agent was last seen (support.presence), for the idle release.

A new table, written in batches by the workers; nothing to backfill: an agent without a row is
judged by its latest assignment (support.services.idle_release).
"""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("support", "0012_events_feed"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="AgentPresence",
            fields=[
                (
                    "agent",
                    models.OneToOneField(
                        on_delete=django.db.models.deletion.CASCADE,
                        primary_key=True,
                        related_name="presence",
                        serialize=False,
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
                ("last_seen", models.DateTimeField()),
            ],
            options={"db_table": "support_agent_presence"},
        ),
    ]
