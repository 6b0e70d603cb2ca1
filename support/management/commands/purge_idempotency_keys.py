from django.core.management.base import BaseCommand

from support.api.idempotency import purge_expired


class Command(BaseCommand):
    help = (
        "Delete expired idempotency keys (kept SUPPORT_IDEMPOTENCY_TTL_SECONDS), in batches "
        "that skip rows in use: the workers' background purge, run once, e.g. from cron."
    )

    def handle(self, *args, **options):
        deleted = purge_expired()
        self.stdout.write(f"Deleted {deleted} expired idempotency key(s).")
