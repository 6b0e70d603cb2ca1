"""API tokens: issued at login, stored hashed, expiring, revocable."""

import hashlib
import secrets
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from support.models import ApiToken


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def token_issue(*, user_id: int) -> str:
    """A new token for the user; returns its key, which is not stored anywhere."""
    key = secrets.token_hex(20)
    now = timezone.now()
    ApiToken.objects.create(
        key_hash=key_hash(key),
        user_id=user_id,
        created_at=now,
        expires_at=now + timedelta(seconds=settings.SUPPORT_TOKEN_TTL_SECONDS),
    )
    return key


def token_revoke(*, token_id: int) -> None:
    ApiToken.objects.filter(pk=token_id).delete()


def tokens_revoke_all(*, user_id: int) -> None:
    ApiToken.objects.filter(user_id=user_id).delete()
