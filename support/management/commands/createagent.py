import os

from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from support import services


class Command(BaseCommand):
    help = "Create an agent: an active user in the agents group."

    def add_arguments(self, parser):
        parser.add_argument("username")
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--password", help="the password (visible in the process list)")
        source.add_argument("--password-env", metavar="VAR", help="read the password from $VAR")
        parser.add_argument("--email", default="")

    def handle(self, *args, username, password, password_env, email, **options):
        if password_env:
            password = os.environ.get(password_env)
            if not password:
                raise CommandError(f"${password_env} is not set or empty")
        user = services.User(username=username, email=email)
        try:
            validate_password(password, user=user)
        except ValidationError as exc:
            raise CommandError("Password refused: " + " ".join(exc.messages)) from None
        try:
            agent = services.agent_create(username=username, password=password, email=email)
        except services.InvalidField as exc:
            raise CommandError(exc.detail) from None
        self.stdout.write(f"Agent {agent.username} created (id {agent.pk}).")
