-- churn: fetch (top-up) -> resolve one held ticket -> close it -> fetch ...; one request per
-- run of the script, the step kept in the client's :phase (start with -D phase=0 -D id=0).
\include token_agent.sql
\if :phase = 0
BEGIN;
SELECT 1 FROM auth_user WHERE id = CAST(:agent_id AS int) FOR NO KEY UPDATE;
WITH held AS (
    SELECT t.id, t.title, t.description, t.status, t.priority, t.created_by_id, t.created_at,
           t.updated_at, a.assigned_at
    FROM support_ticketassignment a JOIN support_ticket t ON t.id = a.ticket_id
    WHERE a.agent_id = CAST(:agent_id AS int) AND a.is_active AND a.holding),
pick AS (
    SELECT id FROM support_ticket WHERE status = 'open'
    ORDER BY priority DESC, created_at, id
    LIMIT greatest(15 - (SELECT count(*) FROM held), 0)
    FOR NO KEY UPDATE SKIP LOCKED),
taken AS (
    UPDATE support_ticket t SET status = 'assigned', updated_at = now()
    WHERE t.id = ANY (ARRAY(SELECT id FROM pick))
    RETURNING t.id, t.title, t.description, t.status, t.priority, t.created_by_id,
              t.created_at, t.updated_at, now() AS assigned_at),
assigned AS (
    INSERT INTO support_ticketassignment (ticket_id, agent_id, assigned_at, is_active, holding)
    SELECT id, CAST(:agent_id AS int), now(), true, true FROM taken),
logged AS (
    INSERT INTO support_ticketevent
        (ticket_id, at, actor_id, kind, from_status, to_status, agent_id, changes)
    SELECT id, now(), CAST(:agent_id AS int), 'assigned', 'open', 'assigned',
           CAST(:agent_id AS int),
           jsonb_build_object('assigned_to', jsonb_build_array(NULL, CAST(:agent_id AS int)),
                              'status', '["open", "assigned"]'::jsonb)
    FROM taken)
SELECT * FROM (SELECT * FROM held UNION ALL SELECT * FROM taken) AS mine
ORDER BY assigned_at, id
\aset
COMMIT;
\set phase 1
\elif :phase = 1
WITH moved AS (
    UPDATE support_ticket t SET status = 'resolved', updated_at = now()
    FROM support_ticketassignment a
    WHERE t.id = CAST(:id AS bigint) AND t.status = 'assigned' AND a.ticket_id = t.id
      AND a.is_active AND a.agent_id = CAST(:agent_id AS int)
    RETURNING t.id, t.title, t.description, t.status, t.priority, t.created_by_id,
              t.created_at, t.updated_at, a.agent_id, a.assigned_at),
unheld AS (
    UPDATE support_ticketassignment SET holding = false
    WHERE ticket_id IN (SELECT id FROM moved) AND is_active),
logged AS (
    INSERT INTO support_ticketevent
        (ticket_id, at, actor_id, kind, from_status, to_status, agent_id, changes)
    SELECT id, now(), agent_id, 'status_changed', 'assigned', 'resolved', agent_id,
           '{"status": ["assigned", "resolved"]}'::jsonb
    FROM moved)
SELECT * FROM moved;
\set phase 2
\else
WITH moved AS (
    UPDATE support_ticket t SET status = 'closed', updated_at = now()
    FROM support_ticketassignment a
    WHERE t.id = CAST(:id AS bigint) AND t.status = 'resolved' AND a.ticket_id = t.id
      AND a.is_active AND a.agent_id = CAST(:agent_id AS int)
    RETURNING t.id, t.title, t.description, t.status, t.priority, t.created_by_id,
              t.created_at, t.updated_at, a.agent_id, a.assigned_at),
logged AS (
    INSERT INTO support_ticketevent
        (ticket_id, at, actor_id, kind, from_status, to_status, agent_id, changes)
    SELECT id, now(), agent_id, 'status_changed', 'resolved', 'closed', agent_id,
           '{"status": ["resolved", "closed"]}'::jsonb
    FROM moved)
SELECT * FROM moved;
\set phase 0
\endif
