"""The login endpoint: username and password in, API token out."""

from adrf.views import APIView
from asgiref.sync import sync_to_async
from django.contrib.auth import authenticate
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import exceptions, permissions, serializers
from rest_framework.authtoken.models import Token
from rest_framework.response import Response

from support.api.schema import answers, body_errors
from support.api.serializers import TokenRequestSerializer


def _login(username: str, password: str) -> str | None:
    user = authenticate(username=username, password=password)
    if user is None:
        return None
    token, _ = Token.objects.get_or_create(user=user)
    return token.key


class ObtainTokenView(APIView):
    """POST {username, password} -> {token}. Wrong credentials answer 400, as DRF's does."""

    authentication_classes = []
    permission_classes = [permissions.AllowAny]

    @extend_schema(
        operation_id="auth_token",
        request=TokenRequestSerializer,
        responses=answers(
            {200: inline_serializer("Token", {"token": serializers.CharField()})},
            *body_errors(),
            field_errors=True,
        ),
    )
    async def post(self, request):
        serializer = TokenRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        key = await sync_to_async(_login)(**serializer.validated_data)
        if key is None:
            raise exceptions.ValidationError(
                {"non_field_errors": ["Unable to log in with provided credentials."]}
            )
        return Response({"token": key})
