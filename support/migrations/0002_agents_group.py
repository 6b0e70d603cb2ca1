from django.conf import settings
from django.db import migrations


def create_agents_group(apps, schema_editor):
    apps.get_model("auth", "Group").objects.get_or_create(name=settings.SUPPORT_AGENTS_GROUP)


class Migration(migrations.Migration):
    dependencies = [
        ("support", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]

    operations = [migrations.RunPython(create_agents_group, migrations.RunPython.noop)]
