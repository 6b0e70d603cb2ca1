-- admin-create: the admin's token, then the ticket and its "created" event in one statement.
\include token_admin.sql
WITH t AS (
    INSERT INTO support_ticket
        (title, description, status, priority, created_at, updated_at, created_by_id)
    VALUES ('Printer on floor ' || CAST(:client_id AS text) || ' is jammed',
            'Reported by phone.', 'open', 1, now(), now(), CAST(:admin_id AS int))
    RETURNING *),
e AS (
    INSERT INTO support_ticketevent
        (ticket_id, at, actor_id, kind, from_status, to_status, agent_id, changes)
    SELECT id, created_at, created_by_id, 'created', '', 'open', NULL,
           jsonb_build_object('title', jsonb_build_array(NULL, title),
                              'description', jsonb_build_array(NULL, description),
                              'priority', '[null, "normal"]'::jsonb)
    FROM t)
SELECT * FROM t;
