"""Token authentication and the two role permissions (no view here: DRF imports this early)."""

from django.conf import settings
from django.contrib.auth import get_user_model
from django.utils import timezone
from rest_framework import authentication, exceptions, permissions

from support import presence
from support.models import ApiToken
from support.prepared import Prepared
from support.services import is_agent_expr
from support.tokens import key_hash

User = get_user_model()


def _token_query(key_hash: str):
    return (
        ApiToken.objects.filter(key_hash=key_hash)
        .annotate(is_agent=is_agent_expr("user_id"))
        .values_list(
            "pk",
            "expires_at",
            "user_id",
            "user__is_superuser",
            "user__username",
            "user__is_staff",
            "user__is_active",
            "is_agent",
        )
    )


# Every API request runs it: compiled once per process (support.prepared).
_TOKEN = Prepared(_token_query, key_hash=str)
_USER_FIELDS = ["id", "is_superuser", "username", "is_staff", "is_active"]  # model order


def presented_token(request) -> str | None:
    """The key of the request's ``Authorization: Token <key>``, if it has one."""
    parts = authentication.get_authorization_header(request).split()
    if len(parts) == 2 and parts[0].lower() == b"token":
        return parts[1].decode("latin-1")
    return None


class TokenAuthentication(authentication.TokenAuthentication):
    """DRF's ``Authorization: Token <key>`` scheme over hashed, expiring tokens.

    One query finds the token by its key's hash, with its user and the user's agent role.
    It runs in the request's one worker-thread hop (``support.api.views.APIView``), before the
    handler's own work, so this stays a plain sync authenticator. The user comes back with the
    fields the checks read; any other is loaded if asked for. An agent's request marks it
    present (support.presence: in memory, no statement), whatever the endpoint answers.
    """

    def authenticate_credentials(self, key):
        if not key.isascii() or not key.isalnum():
            # Keys are hex; anything else cannot match, and a NUL would be refused by PostgreSQL.
            raise exceptions.AuthenticationFailed("Invalid token.")
        rows = _TOKEN.rows(key_hash=key_hash(key))
        if not rows:
            raise exceptions.AuthenticationFailed("Invalid token.")
        token_id, expires_at, user_id, *user_values, is_agent = rows[0]
        if expires_at <= timezone.now():
            raise exceptions.AuthenticationFailed("Token expired; log in again.")
        user = User.from_db("default", _USER_FIELDS, [user_id, *user_values])
        if not user.is_active:
            raise exceptions.AuthenticationFailed("User inactive or deleted.")
        user.is_agent = is_agent
        if is_agent:
            presence.seen(user_id)
        token = ApiToken.from_db(
            "default", ["id", "user_id", "expires_at"], [token_id, user_id, expires_at]
        )
        token.user = user
        return user, token


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
            if user.is_agent:  # (a token's agent was marked by the token check)
                presence.seen(user.pk)
        return user.is_agent


def authenticate_again(request) -> "User | None":
    """The request's user as the database has it now (for a long request, such as an event
    stream, that checks its caller again from time to time): through the token again (None
    when it was revoked or expired, or its user deactivated), or, for a session, the user's
    row again (active or None; a logout elsewhere is not seen)."""
    authenticator = request.successful_authenticator
    if isinstance(authenticator, TokenAuthentication):
        try:
            found = authenticator.authenticate(request)
        except exceptions.AuthenticationFailed:
            return None
        return found[0] if found else None
    user = User.objects.filter(pk=request.user.pk, is_active=True).first()
    if user is not None:
        user.is_agent = user.groups.filter(name=settings.SUPPORT_AGENTS_GROUP).exists()
    return user


class LogoutAuthentication(TokenAuthentication):
    """The logout's token check. It also knows a token that a keyed logout revoked, for that
    logout's retry alone (the same Idempotency-Key): the retry is the same caller's, and gets
    the first answer (support.api.idempotency) instead of 401."""

    def authenticate(self, request):
        self._request = request
        return super().authenticate(request)

    def authenticate_credentials(self, key):
        try:
            return super().authenticate_credentials(key)
        except exceptions.AuthenticationFailed as refused:
            from support.api import idempotency  # (this module is imported by DRF's settings)

            try:
                idempotency_key = idempotency.request_key(self._request)
            except exceptions.ValidationError:
                # no logout stored a malformed key: the credentials' 401 comes first, as on
                # every route (the key's 400 is for a caller the checks let in)
                raise refused from None
            stored = idempotency_key and idempotency.stored_logout(idempotency_key, key_hash(key))
            if not stored:
                raise
            return User(pk=stored.user_id), None
