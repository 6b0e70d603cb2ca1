"""Log in (username and password in, a new API token out) and log out (the token revoked)."""

from contextlib import suppress

from django.contrib.auth import authenticate
from django.db import DatabaseError
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import exceptions, permissions, serializers, status
from rest_framework.authentication import SessionAuthentication
from rest_framework.response import Response

from support.api.auth import LogoutAuthentication, presented_token
from support.api.schema import IDEMPOTENCY_KEY, REPLAYED, answers, body_errors, keyed
from support.api.serializers import TokenRequestSerializer
from support.api.throttles import LoginByAddressThrottle, LoginFailureLimits, client_address
from support.api.views import APIView
from support.models import ApiToken
from support.tokens import key_hash, token_issue, token_revoke


def _login(username: str, password: str, address: str) -> str | None:
    """A new token's key for the right password, else None (a failure, counted). Raises
    Throttled (429) without checking the password when the name has had too many failures
    from this address, or from everywhere."""
    limits = LoginFailureLimits(username, address)
    limits.take()
    try:
        user = authenticate(username=username, password=password)
    except BaseException:
        with suppress(DatabaseError):  # the database may be what failed
            limits.give_back()
        raise
    if user is None:
        return None
    limits.succeeded()
    return token_issue(user_id=user.pk)


class ObtainTokenView(APIView):
    """POST {username, password} -> {token}: a new token on every login, valid for
    SUPPORT_TOKEN_TTL_SECONDS. Wrong credentials answer 400, as DRF's does; too many attempts
    from one address, or failed logins for one username (from this address, or from all),
    answer 429 with Retry-After."""

    authentication_classes = []
    permission_classes = [permissions.AllowAny]
    throttle_classes = [LoginByAddressThrottle]

    @extend_schema(
        operation_id="auth_token",
        request=TokenRequestSerializer,
        responses=answers(
            {200: inline_serializer("Token", {"token": serializers.CharField()})},
            429,
            *body_errors(),
            field_errors=True,
        ),
    )
    async def post(self, request):
        return await self.in_thread(self._login, request)

    def _login(self, request):
        serializer = TokenRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        key = _login(**serializer.validated_data, address=client_address(request))
        if key is None:
            raise exceptions.ValidationError(
                {"non_field_errors": ["Unable to log in with provided credentials."]}
            )
        return Response({"token": key})


class LogoutView(APIView):
    """POST: revoke the token this request was made with (other tokens stay valid). Retried
    with its Idempotency-Key after the token is gone, it answers what it first answered."""

    authentication_classes = [LogoutAuthentication, SessionAuthentication]
    idempotency_keys = True

    def idempotency_credential(self) -> str:
        token = presented_token(self.request)
        return key_hash(token) if token else ""

    @extend_schema(
        operation_id="auth_logout",
        request=None,
        parameters=[IDEMPOTENCY_KEY, REPLAYED],
        responses=keyed(answers({204: None}, 401)),
    )
    async def post(self, request):
        return await self.in_thread(self._logout, request)

    def _logout(self, request):
        if isinstance(request.auth, ApiToken):
            token_revoke(token_id=request.auth.pk)
        return Response(status=status.HTTP_204_NO_CONTENT)
