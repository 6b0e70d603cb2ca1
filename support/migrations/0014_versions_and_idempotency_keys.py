"""Ticket versions (the ETag) and idempotency keys.

``version`` is added with a database default: on PostgreSQL 11 and later that changes the
table's catalog only, however many tickets there are (no rewrite, a brief lock), and every
existing ticket reads as version 1. The keys are a new table.
"""

import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('support', '0013_agent_presence'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name='ticket',
            name='version',
            field=models.BigIntegerField(db_default=1, default=1, editable=False),
        ),
        migrations.CreateModel(
            name='IdempotencyKey',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('key', models.CharField(max_length=255)),
                ('fingerprint', models.CharField(max_length=64)),
                ('status', models.PositiveSmallIntegerField()),
                ('body', models.TextField(blank=True)),
                ('headers', models.JSONField(default=dict)),
                ('credential', models.CharField(blank=True, default='', max_length=64)),
                ('created_at', models.DateTimeField(default=django.utils.timezone.now)),
                ('expires_at', models.DateTimeField()),
                ('user', models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='+', to=settings.AUTH_USER_MODEL)),
            ],
            options={
                'db_table': 'support_idempotency_key',
                'indexes': [models.Index(fields=['expires_at'], name='idempotency_expiry_idx'), models.Index(condition=models.Q(('credential', ''), _negated=True), fields=['credential'], name='idempotency_credential_idx')],
                'constraints': [models.UniqueConstraint(fields=('user', 'key'), name='idempotency_key_per_user')],
            },
        ),
    ]
