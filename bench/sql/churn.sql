-- churn: fetch (top-up) -> resolve one held ticket -> close it -> fetch ...; one request per
-- run of the script, the step kept in the client's :phase (start with -D phase=0 -D id=0).
\include token_agent.sql
\if :phase = 0
BEGIN;
SELECT 1 FROM auth_user WHERE id = CAST(:agent_id AS int) FOR NO KEY UPDATE;
WITH held AS (
    SELECT id, title, description, status, priority, created_by_id, created_at, updated_at,
           assigned_to_id, assigned_at, version
    FROM support_ticket
    WHERE assigned_to_id = CAST(:agent_id AS int) AND status = 'assigned'),
pick AS (
    SELECT id FROM support_ticket WHERE status = 'open'
    ORDER BY priority DESC, created_at, id
    LIMIT greatest(15 - (SELECT count(*) FROM held), 0)
    FOR NO KEY UPDATE SKIP LOCKED),
taken AS (
    UPDATE support_ticket t
    SET status = 'assigned', assigned_to_id = CAST(:agent_id AS int), assigned_at = now(),
        updated_at = now(), version = version + 1
    WHERE t.id = ANY (ARRAY(SELECT id FROM pick))
    RETURNING t.id, t.title, t.description, t.status, t.priority, t.created_by_id,
              t.created_at, t.updated_at, t.assigned_to_id, t.assigned_at, t.version),
assigned AS (
    INSERT INTO support_ticketassignment (ticket_id, agent_id, assigned_at, is_active)
    SELECT id, assigned_to_id, assigned_at, true FROM taken),
logged AS (
    INSERT INTO support_ticketevent
        (ticket_id, at, actor_id, kind, from_status, to_status, agent_id, changes)
    SELECT id, assigned_at, assigned_to_id, 'assigned', 'open', 'assigned', assigned_to_id,
           jsonb_build_object('assigned_to', jsonb_build_array(NULL, assigned_to_id),
                              'status', '["open", "assigned"]'::jsonb)
    FROM taken)
SELECT * FROM (SELECT * FROM held UNION ALL SELECT * FROM taken) AS mine
ORDER BY assigned_at, id
\aset
COMMIT;
\set phase 1
\elif :phase = 1
WITH moved AS (
    UPDATE support_ticket SET status = 'resolved', updated_at = now(), version = version + 1
    WHERE id = CAST(:id AS bigint) AND status = 'assigned'
      AND assigned_to_id = CAST(:agent_id AS int)
    RETURNING id, title, description, status, priority, created_by_id, created_at,
              updated_at, assigned_to_id, assigned_at, version),
logged AS (
    INSERT INTO support_ticketevent
        (ticket_id, at, actor_id, kind, from_status, to_status, agent_id, changes)
    SELECT id, updated_at, assigned_to_id, 'status_changed', 'assigned', 'resolved',
           assigned_to_id, '{"status": ["assigned", "resolved"]}'::jsonb
    FROM moved)
SELECT * FROM moved;
\set phase 2
\else
WITH moved AS (
    UPDATE support_ticket SET status = 'closed', updated_at = now(), version = version + 1
    WHERE id = CAST(:id AS bigint) AND status = 'resolved'
      AND assigned_to_id = CAST(:agent_id AS int)
    RETURNING id, title, description, status, priority, created_by_id, created_at,
              updated_at, assigned_to_id, assigned_at, version),
logged AS (
    INSERT INTO support_ticketevent
        (ticket_id, at, actor_id, kind, from_status, to_status, agent_id, changes)
    SELECT id, updated_at, assigned_to_id, 'status_changed', 'resolved', 'closed',
           assigned_to_id, '{"status": ["resolved", "closed"]}'::jsonb
    FROM moved)
SELECT * FROM moved;
\set phase 0
\endif
