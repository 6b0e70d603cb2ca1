from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from support import services


class Command(BaseCommand):
    help = (
        "Return to the pool the assigned tickets of agents silent for longer than "
        "SUPPORT_AGENT_IDLE_RELEASE_SECONDS (or --idle-seconds): the service's idle sweep, run "
        "once, e.g. from cron. Does nothing while another sweep runs. Exits 0 whenever it ran."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--idle-seconds",
            type=float,
            help="the silence limit for this run (default: SUPPORT_AGENT_IDLE_RELEASE_SECONDS)",
        )

    def handle(self, *args, idle_seconds, **options):
        if idle_seconds is None:
            idle_seconds = settings.SUPPORT_AGENT_IDLE_RELEASE_SECONDS
            if not idle_seconds:
                self.stdout.write(
                    "Idle release is off (SUPPORT_AGENT_IDLE_RELEASE_SECONDS is not set, and "
                    "no --idle-seconds): nothing released."
                )
                return
        if idle_seconds <= 0:
            raise CommandError("--idle-seconds must be positive")
        sweep = services.idle_agents_release(idle_seconds=idle_seconds)
        if not sweep.ran:
            self.stdout.write("Another sweep is running: nothing released by this one.")
            return
        if not sweep.released:
            self.stdout.write(f"No agent silent for more than {idle_seconds:g} s holds a ticket.")
            return
        names = dict(
            services.User.objects.filter(pk__in=sweep.released).values_list("pk", "username")
        )
        count = sum(len(ids) for ids in sweep.released.values())
        self.stdout.write(
            f"Released {count} ticket(s) of {len(sweep.released)} agent(s) silent for more "
            f"than {idle_seconds:g} s:"
        )
        for agent_id, ids in sweep.released.items():
            tickets = ", ".join(str(pk) for pk in ids)
            self.stdout.write(f"  agent {names.get(agent_id, '?')} (id {agent_id}): {tickets}")
