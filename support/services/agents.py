"""Agent management: create, deactivate (its assigned tickets back to the pool), reactivate.

Locks (support.services.locks): the agent's row, then its tickets; creations queue on the
agents group's row.
"""

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import IntegrityError, transaction

from support.models import ApiToken
from support.services.agent_work import release_assigned
from support.services.errors import NO_AGENT, InvalidField, NotFound
from support.services.locks import lock_users
from support.services.selectors import agents_group

User = get_user_model()

USERNAME_TAKEN = "A user with that username already exists (usernames ignore case)."


def agent_create(*, username: str, password: str, email: str = ""):
    """Create an active user in the agents group. Raises InvalidField when the name is taken,
    in any case: with "alice" taken, "Alice" is refused (as the admin site's user form does).

    Creations queue on the agents group's row (FOR NO KEY UPDATE: memberships added meanwhile
    do not wait), so two names that differ only in case cannot both pass the check; the
    database's unique index is case-sensitive. The password is expected to have passed
    Django's validators already (the serializer's job).
    """
    try:
        with transaction.atomic():
            group = agents_group()
            Group.objects.select_for_update(no_key=True).filter(pk=group.pk).first()
            if User.objects.filter(username__iexact=username).exists():
                raise InvalidField("username", USERNAME_TAKEN)
            user = User.objects.create_user(username=username, password=password, email=email)
            user.groups.add(group)
    except IntegrityError:
        # Two creations of one name raced; the database's unique index decided.
        raise InvalidField("username", USERNAME_TAKEN) from None
    return user


def agent_reactivate(*, agent_id: int) -> None:
    """Make a deactivated agent active again. It holds no ticket (deactivation returned them
    to the pool) and no token (it logs in again). Locks the agent row. Idempotent."""
    with transaction.atomic():
        locked = lock_users([agent_id])
        if agent_id not in locked or not locked[agent_id].is_agent:
            raise NotFound(NO_AGENT)
        if not locked[agent_id].is_active:
            User.objects.filter(pk=agent_id).update(is_active=True)


def agent_deactivate(*, agent_id: int, actor_id: int) -> None:
    """Deactivate an agent and return every ticket it holds in status assigned to the pool.

    Locks the agent row, then its tickets. Resolved and closed tickets keep their agent as the
    record of who worked them. The agent's tokens are deleted, before the tickets are released:
    the ticket write, with its counter row, is the last lock (support.services.locks).
    Idempotent.
    """
    with transaction.atomic():
        locked = lock_users([agent_id])
        if agent_id not in locked or not locked[agent_id].is_agent:
            raise NotFound(NO_AGENT)
        User.objects.filter(pk=agent_id).update(is_active=False)
        ApiToken.objects.filter(user_id=agent_id).delete()
        release_assigned(agent_id, actor_id)
