-- A keyed create's database work in one statement: the ticket, its "created" event, and the
-- key's row holding the answer (201, the ticket's JSON, its ETag). The key: the client's
-- :key_no-th of this run (:run). The request's fingerprint is the caller's work (SHA-256 of
-- method, path, If-Match and body: support.api.idempotency), a constant here.
-- Correct under concurrency and on a repeat without a lock: the key's unique index
-- (idempotency_key_per_user) refuses a second row for the key, and the whole statement, the
-- ticket with it, fails; a concurrent first run of the key makes it wait for that one's end.
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
    FROM t),
k AS (
    INSERT INTO support_idempotency_key
        (user_id, key, fingerprint, status, body, headers, credential, created_at, expires_at)
    SELECT created_by_id,
           format('bench-%s-%s-%s', CAST(:run AS bigint), CAST(:client_id AS int),
                  CAST(:key_no AS bigint)),
           '4d7ff11e394a01442331d0fae010987b5dee42c7d51810c285bf7426bd121bef', 201,
           json_build_object('id', id, 'title', title, 'description', description,
                             'status', status, 'priority', 'normal',
                             'created_by', created_by_id, 'assigned_to', assigned_to_id,
                             'assigned_at', assigned_at, 'created_at', created_at,
                             'updated_at', updated_at, 'version', version)::text,
           jsonb_build_object('ETag', format('"%s.%s"', id, version)), '',
           created_at, created_at + interval '24 hours'
    FROM t)
SELECT * FROM t;
