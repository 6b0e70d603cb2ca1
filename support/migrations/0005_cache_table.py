from django.core.management import call_command
from django.db import migrations


def create_cache_table(apps, schema_editor):
    # The table behind settings.CACHES (shared throttle counters); skipped if it exists.
    call_command("createcachetable", database=schema_editor.connection.alias, verbosity=0)


class Migration(migrations.Migration):
    dependencies = [("support", "0004_api_tokens")]

    operations = [migrations.RunPython(create_cache_table, migrations.RunPython.noop)]
