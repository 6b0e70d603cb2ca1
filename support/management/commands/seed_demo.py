import random
import secrets

from django.core.management.base import BaseCommand
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
    # Each run resets the demo users' passwords and replaces their tokens.

    def add_arguments(self, parser):
        parser.add_argument("--tickets", type=int, default=40)

    @transaction.atomic
    def handle(self, *args, tickets, **options):
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
        Ticket.objects.bulk_create(
            Ticket(
                title=f"{rng.choice(TITLES)} ({n})",
                description="Demo ticket.",
                priority=rng.choice(Ticket.Priority.values),
                created_by=admin,
            )
            for n in range(max(0, missing))
        )

        self.stdout.write(f"Demo data: {Ticket.objects.count()} tickets.")
        self.stdout.write(f"{'role':6} {'username':9} {'password':18} token")
        for role, username, password, key in credentials:
            self.stdout.write(f"{role:6} {username:9} {password:18} {key}")
