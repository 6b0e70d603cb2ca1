"""The refusals the services raise, each mapped to one HTTP answer in support.api.errors."""

from collections.abc import Iterable


class ServiceError(Exception):
    """A refused operation; ``detail`` is meant for the person who asked."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class NotFound(ServiceError):
    pass


class Conflict(ServiceError):
    """The request is well-formed but a rule forbids it now (HTTP 409)."""


class TransitionNotAllowed(Conflict):
    """A move support.rules does not give this caller; ``allowed`` are the ones it does."""

    def __init__(self, current: str, requested: str, allowed: Iterable[str]):
        allowed = tuple(allowed)
        nxt = ", ".join(allowed) if allowed else "none"
        super().__init__(
            f"Cannot move a ticket from '{current}' to '{requested}'. Allowed next statuses: {nxt}."
        )
        self.current = current
        self.allowed = allowed


class AgentAtCapacity(Conflict):
    pass


class ConcurrentChange(Conflict):
    pass


class VersionMismatch(ServiceError):
    """The ticket is not at a version the caller named (If-Match): HTTP 412, nothing changed."""

    def __init__(self, ticket_id: int, version: int):
        super().__init__(
            "The ticket has changed since the version you named in If-Match; read it again."
        )
        self.ticket_id = ticket_id
        self.version = version


def check_version(ticket_id: int, version: int, versions) -> None:
    """Raise VersionMismatch unless ``versions`` (None: any) has the ticket's ``version``."""
    if versions is not None and version not in versions:
        raise VersionMismatch(ticket_id, version)


class InvalidField(ServiceError):
    """A field names something that does not qualify (HTTP 400 with field errors)."""

    def __init__(self, field: str, detail: str):
        super().__init__(detail)
        self.field = field


class AgentInactive(ServiceError):
    """The caller's account was deactivated while the request ran (HTTP 401)."""


class NotAnAgent(ServiceError):
    """The caller is not in the agents group (HTTP 403)."""


NOT_YOURS = "No such ticket among yours."
NO_TICKET = "No Ticket matches the given query."
NO_AGENT = "No agent matches the given query."
