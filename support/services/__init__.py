"""The ticket service's rules in action: every write, and the reads the API and admin share.

Each write is a plain synchronous function that runs its whole work in one transaction; views
call it from their one worker-thread hop (``support.api.views``). What may happen to a ticket
is support.rules; how the services take their locks is support.services.locks.

- ``errors``: the refusals, each one HTTP answer (support.api.errors maps them);
- ``selectors``: reads (tickets as rows, what an agent holds, agents with their load, the
  admin list's counts and pages);
- ``locks``: the lock contract and the helpers that take the locks;
- ``records``: the one writer of a ticket's status and holder and of its history;
- ``agent_work``: the agent's fetch (top-up), its moves, its hand-backs, releases;
- ``idle_release``: the assigned tickets of agents silent too long, back to the pool;
- ``admin_tickets``: an admin's create, edit and delete;
- ``agents``: creating, deactivating and reactivating agents.
"""

from support.services.admin_tickets import ticket_create, ticket_delete, ticket_update
from support.services.agent_work import (
    agent_release_tickets,
    ticket_release_by_agent,
    ticket_transition_by_agent,
    tickets_top_up,
)
from support.services.agents import (
    USERNAME_TAKEN,
    agent_create,
    agent_deactivate,
    agent_reactivate,
)
from support.services.errors import (
    NOT_YOURS,
    AgentAtCapacity,
    AgentInactive,
    ConcurrentChange,
    Conflict,
    InvalidField,
    NotAnAgent,
    NotFound,
    ServiceError,
    TransitionNotAllowed,
    VersionMismatch,
    check_version,
)
from support.services.idle_release import Sweep, idle_agents_release
from support.services.selectors import (
    ROW_FIELDS,
    User,
    agent_holds,
    agent_row,
    agents_group,
    agents_with_load,
    held_count,
    held_query,
    held_tickets,
    is_agent_expr,
    keyset_page,
    list_count,
    newest_tickets,
    status_count,
    ticket_head,
    ticket_history,
    ticket_holder,
    ticket_page,
    ticket_row,
    ticket_rows,
)

__all__ = [
    "NOT_YOURS",
    "ROW_FIELDS",
    "USERNAME_TAKEN",
    "AgentAtCapacity",
    "AgentInactive",
    "ConcurrentChange",
    "Conflict",
    "InvalidField",
    "NotAnAgent",
    "NotFound",
    "ServiceError",
    "Sweep",
    "TransitionNotAllowed",
    "User",
    "VersionMismatch",
    "agent_create",
    "agent_deactivate",
    "agent_holds",
    "agent_reactivate",
    "agent_release_tickets",
    "agent_row",
    "agents_group",
    "agents_with_load",
    "check_version",
    "held_count",
    "held_query",
    "held_tickets",
    "idle_agents_release",
    "is_agent_expr",
    "keyset_page",
    "list_count",
    "newest_tickets",
    "status_count",
    "ticket_create",
    "ticket_delete",
    "ticket_head",
    "ticket_history",
    "ticket_holder",
    "ticket_page",
    "ticket_release_by_agent",
    "ticket_row",
    "ticket_rows",
    "ticket_transition_by_agent",
    "ticket_update",
    "tickets_top_up",
]
