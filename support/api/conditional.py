"""Ticket versions over HTTP: the ETag of every ticket answer and the preconditions that read it
(RFC 9110 sections 8.8.3 and 13).

A ticket's ETag is ``"<id>.<version>"``, strong: its version (support.models.Ticket.version)
goes up with every write of the ticket, a fetch's assignment included, and the JSON of one
version is always the same bytes. Lists carry each ticket's ``version`` in its body instead.

- ``GET /api/tickets/{id}/`` with ``If-None-Match`` naming the current ETag (or ``*``): 304,
  no body (weak comparison, as the RFC asks of GET); with an ``If-Match`` that does not: 412.
- ``PUT``/``PATCH``/``DELETE /api/tickets/{id}/``, the agent's move and its hand-back with
  ``If-Match``: the write happens only if the ticket's version is one the header names (strong
  comparison; ``*``: any version); with ``If-None-Match``, only if it is none the header
  names (``*``: never, the ticket exists). Otherwise 412, with the current ``ETag``, and
  nothing changes. The version is compared under the write's own locks (support.services),
  and for an admin's edit once more before its body is read, so that a stale edit is 412
  whatever its body says (the RFC's order: 404, then the precondition, then the content). The
  agent's move names its ticket in the body, which is therefore read first.
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
from support.services import check_version

ANY = "*"
# entity-tag = [ W/ ] DQUOTE *etagc DQUOTE; etagc: visible ASCII but DQUOTE, and obs-text
_TAG = re.compile(r'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"')
_SEPARATORS = re.compile(r"[ \t,]*")
_END_OF_ELEMENT = re.compile(r"[ \t]*(?:,|\Z)")
# a version as etag() writes it: no leading zero (tags compare as strings, "1.01" is not "1.1")
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


class AcceptedVersions:
    """The versions of one ticket a write's preconditions accept (``version in accepted``):
    those If-Match names (strong comparison: weak tags never match; tags compare as strings,
    so "12.01" is not "12.1"), less those If-None-Match names (weak comparison; ``*``: every
    version, since the ticket exists)."""

    def __init__(self, ticket_id: int, matched, excluded):
        self.ticket_id = ticket_id
        self.matched = matched  # opaque tags, or None: any version
        self.excluded = excluded  # opaque tags, ANY, or None: none

    def __contains__(self, version: int) -> bool:
        tag = etag(self.ticket_id, version)[1:-1]
        if self.matched is not None and tag not in self.matched:
            return False
        return not (self.excluded == ANY or (self.excluded and tag in self.excluded))


def _if_match(request) -> frozenset[str] | None:
    """The strong tags If-Match names; None: no condition (no header, or ``*``)."""
    value = request.META.get("HTTP_IF_MATCH")
    if value is None:
        return None
    tags = _entity_tags("If-Match", value)
    return None if tags == ANY else frozenset(tag for weak, tag in tags if not weak)


def _if_none_match(request) -> frozenset[str] | str | None:
    """The tags If-None-Match names (weak or not), or ANY; None: no header."""
    value = request.META.get("HTTP_IF_NONE_MATCH")
    if value is None:
        return None
    tags = _entity_tags("If-None-Match", value)
    return ANY if tags == ANY else frozenset(tag for _, tag in tags)


def write_preconditions(request, ticket_id: int) -> AcceptedVersions | None:
    """What a write of ticket ``ticket_id`` requires of its version (If-Match, If-None-Match),
    for the service to check under its locks; None: nothing (no header, or If-Match ``*``)."""
    matched, excluded = _if_match(request), _if_none_match(request)
    if matched is None and excluded is None:
        return None
    return AcceptedVersions(ticket_id, matched, excluded)


def admin_write_preconditions(request, ticket_id: int) -> AcceptedVersions | None:
    """``write_preconditions`` of an admin's write, which SUPPORT_REQUIRE_IF_MATCH may make
    carry If-Match (428 when missing)."""
    if settings.SUPPORT_REQUIRE_IF_MATCH and "HTTP_IF_MATCH" not in request.META:
        raise PreconditionRequired()
    return write_preconditions(request, ticket_id)


def not_modified(request, row: dict) -> Response | None:
    """A read's preconditions, in the RFC's order: VersionMismatch (412) when If-Match does not
    name the ticket's current version; 304 when If-None-Match names it (weak comparison);
    else None."""
    matched = _if_match(request)
    check_version(row["id"], row["version"], AcceptedVersions(row["id"], matched, None))
    excluded = _if_none_match(request)
    current = etag(row["id"], row["version"])
    if excluded == ANY or (excluded and current[1:-1] in excluded):
        return Response(status=status.HTTP_304_NOT_MODIFIED, headers={"ETag": current})
    return None
