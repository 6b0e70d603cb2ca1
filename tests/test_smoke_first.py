import pytest

from tests.conftest import create_tickets, run_sync

pytestmark = pytest.mark.django_db(transaction=True)


async def test_fetch(agent_client, admin, agent):
    await run_sync(create_tickets, admin, 20)
    r = await agent_client.get("/api/agent/tickets/")
    assert r.status_code == 200, r.text
    assert len(r.json()) == 15
