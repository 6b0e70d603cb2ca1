-- poll: the agent at the cap: what it holds, in one statement (one snapshot, no lock: a poll
-- at the cap changes nothing, and only a change, which locks the agent, can pass the cap).
\include token_agent.sql
SELECT id, title, description, status, priority, created_by_id, created_at, updated_at,
       assigned_to_id, assigned_at, version
FROM support_ticket
WHERE assigned_to_id = CAST(:agent_id AS int) AND status = 'assigned'
ORDER BY assigned_at, id;
