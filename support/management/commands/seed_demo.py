import random
import secrets

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from support import services
from support.models import Ticket
from support.tokens import token_issue, tokens_revoke_all

AGENTS = ("alice", "bob", "carol")
TITLES = (
    "Cannot log in after password reset",
    "Invoice shows the wrong VAT rate",
    "Export to CSV times out",
    "Two-factor codes arrive late",
    "Dashboard graph is empty",
    "Webhook retries never stop",
    "Search misses recent tickets",
    "Mobile app crashes on start",
)


class Command(BaseCommand):
    help = "Create demo data (an admin, three agents, tickets) and print fresh credentials."
    # Each run resets the demo users' passwords and replaces their tokens: with debug off it
    # might be a real database, where those names are real people.

    def add_arguments(self, parser):
        parser.add_argument("--tickets", type=int, default=40)
        parser.add_argument(
            "--force",
            action="store_true",
            help="run with DJANGO_DEBUG off too (resets the users admin, alice, bob, carol)",
        )

    def handle(self, *args, tickets, force, **options):
        if not settings.DEBUG and not force:
            raise CommandError(
                "seed_demo resets the passwords and tokens of the users admin, alice, bob and "
                "carol, so it runs only with DJANGO_DEBUG on; pass --force to run it anyway."
            )
        self.seed(tickets)

    @transaction.atomic
    def seed(self, tickets: int) -> None:
        User = services.User
        credentials = []
        admin, _ = User.objects.get_or_create(
            username="admin", defaults={"is_staff": True, "is_superuser": True}
        )
        people = [admin]
        for name in AGENTS:
            user = User.objects.filter(username=name).first()
            if user is None:
                user = User.objects.create_user(username=name, email=f"{name}@example.com")
            user.groups.add(services.agents_group())
            people.append(user)
        for user in people:
            password = secrets.token_urlsafe(12)  # new each run; printed below
            user.set_password(password)
            user.is_active = True
            user.save()
            # Tokens are stored hashed: the old ones cannot be printed, so they are replaced.
            tokens_revoke_all(user_id=user.pk)
            token = token_issue(user_id=user.pk)
            role = "admin" if user.is_staff else "agent"
            credentials.append((role, user.username, password, token))

        missing = tickets - Ticket.objects.count()
        rng = random.Random(7)
        for n in range(max(0, missing)):
            # Through the service, like the API: each ticket gets its `created` event.
            services.ticket_create(
                title=f"{rng.choice(TITLES)} ({n})",
                description="Demo ticket.",
                priority=rng.choice(Ticket.Priority.values),
                created_by_id=admin.pk,
            )

        self.stdout.write(f"Demo data: {Ticket.objects.count()} tickets.")
        self.stdout.write(f"{'role':6} {'username':9} {'password':18} token")
        for role, username, password, key in credentials:
            self.stdout.write(f"{role:6} {username:9} {password:18} {key}")
