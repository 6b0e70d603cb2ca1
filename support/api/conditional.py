"""Ticket versions over HTTP: the ETag of every ticket answer and the preconditions that read it
(RFC 9110 sections 8.8.3 and 13).

A ticket's ETag is ``"<id>.<version>"``, strong: its version (support.models.Ticket.version)
goes up with every write of the ticket, a fetch's assignment included, and the JSON of one
version is always the same bytes. Lists carry each ticket's ``version`` in its body instead.

- ``GET /api/tickets/{id}/`` with ``If-None-Match`` naming the current ETag (or ``*``): 304,
  no body (weak comparison, as the RFC asks of GET).
- ``PUT``/``PATCH``/``DELETE /api/tickets/{id}/``, the agent's move and its hand-back with
  ``If-Match``: the write happens only if the ticket's version is one the header names (strong
  comparison; ``*``: any version). Otherwise 412, with the current ``ETag``, and nothing
  changes. The version is compared under the write's own locks (support.services), and for an
  admin's edit once more before its body is read, so that a stale edit is 412 whatever its
  body says (the RFC's order: 404, then the precondition, then the content).
- ``SUPPORT_REQUIRE_IF_MATCH``: an admin's ``PUT``/``PATCH``/``DELETE`` without ``If-Match``
  is 428, before anything is read.
- A malformed ``If-Match``/``If-None-Match`` is 400 (a precondition the service cannot read
  is not silently ignored).
"""

import re

from django.conf import settings
from rest_framework import exceptions, status
from rest_framework.response import Response

from support.api.serializers import ticket_json

ANY = "*"
# entity-tag = [ W/ ] DQUOTE *etagc DQUOTE; etagc: visible ASCII but DQUOTE, and obs-text
_TAG = re.compile(r'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"')
_SEPARATORS = re.compile(r"[ \t,]*")
_END_OF_ELEMENT = re.compile(r"[ \t]*(?:,|\Z)")
# a version as etag() writes it: no leading zero (tags compare as strings, "1.01" is not "1.1")
_VERSION = re.compile(r"0|[1-9][0-9]{0,17}")
MALFORMED = 'Entity tags in double quotes (e.g. "12.3"), separated by commas, or *.'


class PreconditionRequired(exceptions.APIException):
    status_code = 428
    default_detail = (
        "This service requires If-Match on ticket writes: read the ticket, then send its ETag "
        "in If-Match."
    )
    default_code = "precondition_required"


def etag(ticket_id: int, version: int) -> str:
    return f'"{ticket_id}.{version}"'


def ticket_response(row: dict, status_code: int = status.HTTP_200_OK) -> Response:
    """A ticket answer: its JSON, with its ETag."""
    return Response(
        ticket_json(row), status=status_code, headers={"ETag": etag(row["id"], row["version"])}
    )


def _entity_tags(header: str, value: str) -> list[tuple[bool, str]] | str:
    """``*``, or the (weak, opaque-tag) pairs of a list; ValidationError (400) if malformed."""
    value = value.strip(" \t")
    if value == ANY:
        return ANY
    tags: list[tuple[bool, str]] = []
    position = 0
    while True:
        position = _SEPARATORS.match(value, position).end()  # (empty list elements allowed)
        if position == len(value):
            break
        found = _TAG.match(value, position)
        after = found and _END_OF_ELEMENT.match(value, found.end())
        if not after:
            raise exceptions.ValidationError({header: [MALFORMED]})
        tags.append((found.group(1) is not None, found.group(2)))
        position = after.end()
    if not tags:
        raise exceptions.ValidationError({header: [MALFORMED]})
    return tags


def if_match_versions(request, ticket_id: int) -> frozenset[int] | None:
    """The versions of ticket ``ticket_id`` the request's If-Match accepts; None when it sets
    no condition on the version (no header, or ``*``). Weak tags never match (strong
    comparison), nor do tags of other tickets, nor another spelling of a version ("12.01" is
    not "12.1": tags compare character by character)."""
    value = request.META.get("HTTP_IF_MATCH")
    if value is None:
        return None
    tags = _entity_tags("If-Match", value)
    if tags == ANY:
        return None
    prefix = f"{ticket_id}."
    return frozenset(
        int(version)
        for weak, tag in tags
        if not weak and tag.startswith(prefix)
        for version in [tag[len(prefix) :]]
        if _VERSION.fullmatch(version)
    )


def admin_write_versions(request, ticket_id: int) -> frozenset[int] | None:
    """``if_match_versions`` for an admin's write, which SUPPORT_REQUIRE_IF_MATCH may make
    mandatory (428 when missing)."""
    if settings.SUPPORT_REQUIRE_IF_MATCH and "HTTP_IF_MATCH" not in request.META:
        raise PreconditionRequired()
    return if_match_versions(request, ticket_id)


def not_modified(request, row: dict) -> Response | None:
    """304 when If-None-Match names the ticket's current version (weak comparison), else None."""
    value = request.META.get("HTTP_IF_NONE_MATCH")
    if value is None:
        return None
    tags = _entity_tags("If-None-Match", value)
    current = etag(row["id"], row["version"])[1:-1]
    if tags == ANY or any(tag == current for _, tag in tags):
        return Response(status=status.HTTP_304_NOT_MODIFIED, headers={"ETag": f'"{current}"'})
    return None
