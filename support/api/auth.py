"""Token authentication and the two role permissions (no view here: DRF imports this early)."""

from django.conf import settings
from django.utils import timezone
from rest_framework import authentication, exceptions, permissions

from support.models import ApiToken
from support.services import is_agent_expr
from support.tokens import key_hash


class TokenAuthentication(authentication.TokenAuthentication):
    """DRF's ``Authorization: Token <key>`` scheme over hashed, expiring tokens.

    One query finds the token by its key's hash, with its user and the user's agent role.
    It runs in the request's one worker-thread hop (``support.api.views.APIView``), before the
    handler's own work, so this stays a plain sync authenticator.
    """

    def authenticate_credentials(self, key):
        if not key.isascii() or not key.isalnum():
            # Keys are hex; anything else cannot match, and a NUL would be refused by PostgreSQL.
            raise exceptions.AuthenticationFailed("Invalid token.")
        token = (
            ApiToken.objects.select_related("user")
            .annotate(is_agent=is_agent_expr("user_id"))
            .filter(key_hash=key_hash(key))
            .first()
        )
        if token is None:
            raise exceptions.AuthenticationFailed("Invalid token.")
        if token.expires_at <= timezone.now():
            raise exceptions.AuthenticationFailed("Token expired; log in again.")
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed("User inactive or deleted.")
        token.user.is_agent = token.is_agent
        return token.user, token


class IsAdmin(permissions.BasePermission):
    """An active staff user."""

    message = "Only admins may use this endpoint."

    def has_permission(self, request, view):
        user = request.user
        return bool(user and user.is_authenticated and user.is_active and user.is_staff)


class IsAgent(permissions.BasePermission):
    """An active user in the agents group."""

    message = "Only agents may use this endpoint."

    def has_permission(self, request, view):
        user = request.user
        if not (user and user.is_authenticated and user.is_active):
            return False
        if not hasattr(user, "is_agent"):  # a session user: the role was not read with a token
            user.is_agent = user.groups.filter(name=settings.SUPPORT_AGENTS_GROUP).exists()
        return user.is_agent
