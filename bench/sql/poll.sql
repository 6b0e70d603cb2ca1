-- poll: lock the agent's row and read what it holds, in one statement.
\include token_agent.sql
WITH me AS (SELECT id FROM auth_user WHERE id = CAST(:agent_id AS int) FOR NO KEY UPDATE)
SELECT t.id, t.title, t.description, t.status, t.priority, t.created_by_id, t.created_at,
       t.updated_at, a.agent_id, a.assigned_at
FROM support_ticketassignment a JOIN support_ticket t ON t.id = a.ticket_id
WHERE a.agent_id = (SELECT id FROM me) AND a.is_active AND a.holding
ORDER BY a.assigned_at, t.id;
