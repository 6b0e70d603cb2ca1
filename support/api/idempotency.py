"""``Idempotency-Key``: a POST retried with the same key gets the first answer, not a second
effect.

Every POST that changes something takes the header (the views with ``idempotency_keys``:
ticket create, agent create, the agent's move and hand-back, logout); other methods ignore it
(PUT, PATCH and DELETE are made safe by If-Match, support.api.conditional). A key is 1 to 255
visible ASCII characters, sent bare or as a quoted string; it belongs to the caller (another
user's same key is another request) for SUPPORT_IDEMPOTENCY_TTL_SECONDS (24 h).

A keyed request, after its checks (token, role, throttle: their refusals are not stored),
runs in one transaction:

1. ``pg_try_advisory_xact_lock(user, hash(key))``: the key's lock, never waited for;
2. the key's row, read after the lock: a request that got the lock sees every earlier
   request of that key committed, since a transaction's locks are released after its commit
   is visible;
   - found (not expired), same request: its stored status, body and ETag, with
     ``Idempotent-Replayed: true``; no effect. Another request (method, path, If-Match or
     body differ, or a logout's token; the JSON body compared as data, so key order and
     spacing do not count): 422;
   - not found, lock not got: the first request of the key is still running: 409 with
     ``Retry-After: 1``;
3. the effect (the service's own transaction, a savepoint in this one), then the key's row
   with the answer, in this transaction: both commit, or neither. A refusal (4xx) is stored
   like a success, so a retry cannot turn it into one; a failure (5xx: the database, a lock
   wait) stores nothing and rolls everything back, so a retry runs anew, as does a refusal
   of the caller the service finds under its lock (401, 403: deactivated, or no longer an
   agent), which the checks before the work would have given.

The key's row is written after the effect, so it adds no lock before the service's own (the
lock contract in support.services.locks): the advisory lock is only tried, and the row is new
(its unique index waits for nobody: another request of the key would hold the advisory lock).
On SQLite every write transaction runs alone (BEGIN IMMEDIATE), so there is no lock to try.

Expired rows count as absent and are removed by the housekeeping task (:func:`purge_batch`,
a slice of batches at a time, skipping rows in use) or ``manage.py purge_idempotency_keys``
(:func:`purge_expired`).
"""

import contextlib
import hashlib
import json
import re
from datetime import timedelta
from urllib.parse import urlencode

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.http import HttpResponse
from django.http.request import RawPostDataException
from django.utils import timezone
from rest_framework import exceptions, status
from rest_framework.renderers import JSONRenderer

from support.models import IdempotencyKey

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
_KEY = re.compile(r"[\x21-\x7e]{1,255}")
# the headers of an answer that are part of it, and replayed with it
_STORED_HEADERS = ("ETag",)
# Refusals of the caller, not of the request (its token, its account or role, its rate): the
# checks before the work give them, and a service that checks the caller again under its lock
# (support.services.locks.require_active_agent). Not stored: once the caller may, the retry runs.
_CALLER_REFUSALS = frozenset({401, 403, 429})
PURGE_BATCH = 1000


class KeyInUse(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = (
        "A request with this Idempotency-Key is still running; retry it when that one has answered."
    )
    default_code = "idempotency_key_in_use"
    wait = 1  # DRF answers it as Retry-After


class KeyReused(exceptions.APIException):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_detail = (
        "This Idempotency-Key was used for another request (method, path, If-Match, body or a "
        "logout's token differ); use a new key for a new request."
    )
    default_code = "idempotency_key_reused"


def request_key(request) -> str | None:
    """The request's key, None without the header; 400 when it is not a valid key."""
    value = request.META.get("HTTP_IDEMPOTENCY_KEY")
    if value is None:
        return None
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]  # the structured-field string form of the IETF draft
    if not _KEY.fullmatch(value):
        raise exceptions.ValidationError(
            {HEADER: ["1 to 255 visible ASCII characters (a random UUID makes a good key)."]}
        )
    return value


def fingerprint(request, credential: str = "") -> str:
    """SHA-256 of what makes the request this request: method, path, its preconditions
    (If-Match, If-None-Match) and body (a
    JSON body as data, its keys sorted; anything else as bytes), and the ``credential`` it
    acts on, if any (a logout's token: another token's logout is another request)."""
    try:
        body = request._request.body
    except RawPostDataException:  # a form read by the session check's CSRF: its fields
        body = urlencode(sorted(request._request.POST.lists()), doseq=True).encode()
    # not JSON: compared as sent (the parser refuses it anyway)
    with contextlib.suppress(ValueError, RecursionError):
        body = json.dumps(
            json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    digest = hashlib.sha256()
    parts = [
        request.method.encode(),
        request.path.encode(),
        request.META.get("HTTP_IF_MATCH", "").encode("latin-1"),
        body,
    ]
    if "HTTP_IF_NONE_MATCH" in request.META:  # (only then, as for the credential below)
        parts.append(b"If-None-Match: " + request.META["HTTP_IF_NONE_MATCH"].encode("latin-1"))
    if credential:  # (only then: every other request's fingerprint stays as it was)
        parts.append(credential.encode())
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def _lock_key(user_id: int, key: str) -> bool:
    """Try the key's advisory lock (two 32-bit keys: apart from the idle sweep's 64-bit one,
    by PostgreSQL's rule). False: another transaction holds it."""
    if connection.vendor != "postgresql":
        return True
    digest = hashlib.sha256(key.encode()).digest()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_try_advisory_xact_lock(%s::integer, %s::integer)",
            # user ids are 32-bit (serializers.MAX_USER_ID); folded, should they ever not be
            [user_id % 2**31, int.from_bytes(digest[:4], "big", signed=True)],
        )
        return cursor.fetchone()[0]


def _replay(stored: IdempotencyKey) -> HttpResponse:
    response = HttpResponse(stored.body, status=stored.status, content_type="application/json")
    if not stored.body:
        del response["Content-Type"]
    for name, value in stored.headers.items():
        response[name] = value
    response[REPLAYED] = "true"
    return response


def keyed(view, key: str, work, *, credential: str = ""):
    """Run ``work()`` (the view's work, after its checks) under the request's key: the first
    answer, stored with the effect, or the stored answer of an earlier run. ``credential``:
    the hash of the token a logout revokes (support.api.login)."""
    request = view.request
    user_id = request.user.pk
    wanted = fingerprint(request, credential)
    with transaction.atomic():
        free = _lock_key(user_id, key)
        stored = IdempotencyKey.objects.filter(user_id=user_id, key=key).first()
        now = timezone.now()
        if stored is not None and stored.expires_at <= now:
            if free:
                stored.delete()  # the key is free for a new request
            stored = None
        if stored is not None:
            if stored.fingerprint != wanted:
                raise KeyReused()
            return _replay(stored)
        if not free:
            raise KeyInUse()
        try:
            response = work()
        except DatabaseError:
            raise  # no answer to store: everything rolls back, a retry runs anew
        except Exception as exc:
            response = view.handle_exception(exc)  # a refusal, stored like an answer
        if response.status_code >= 500 or response.status_code in _CALLER_REFUSALS:
            transaction.set_rollback(True)
            return response
        data = getattr(response, "data", None)
        IdempotencyKey.objects.create(
            user_id=user_id,
            key=key,
            fingerprint=wanted,
            status=response.status_code,
            body="" if data is None else JSONRenderer().render(data).decode(),
            headers={name: response[name] for name in _STORED_HEADERS if name in response},
            credential=credential,
            created_at=now,
            expires_at=now + timedelta(seconds=settings.SUPPORT_IDEMPOTENCY_TTL_SECONDS),
        )
    return response


def stored_logout(key: str, credential: str) -> IdempotencyKey | None:
    """The unexpired keyed logout that revoked the token whose hash is ``credential``."""
    return (
        IdempotencyKey.objects.filter(key=key, credential=credential, expires_at__gt=timezone.now())
        .only("user_id")
        .first()
    )


def purge_batch(batch: int = PURGE_BATCH) -> int:
    """Delete up to ``batch`` expired keys in one short transaction, skipping rows another
    transaction has locked (a request deleting the same expired key): it never waits, and no
    request waits on it for longer than one batch. Returns how many were deleted."""
    with transaction.atomic():
        ids = list(
            IdempotencyKey.objects.select_for_update(skip_locked=True)
            .filter(expires_at__lte=timezone.now())
            .order_by("expires_at")
            .values_list("pk", flat=True)[:batch]
        )
        if ids:
            IdempotencyKey.objects.filter(pk__in=ids).delete()
    return len(ids)


def purge_expired(batch: int = PURGE_BATCH) -> int:
    """Delete every expired key, ``batch`` rows at a time (:func:`purge_batch`). Returns how
    many were deleted."""
    deleted = 0
    while True:
        done = purge_batch(batch)
        deleted += done
        if done < batch:
            return deleted
