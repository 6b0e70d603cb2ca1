-- admin-list: the admin's token, the count (the sum of the sharded ticket counters, kept by
-- triggers: migration 0009), the first page of 20 (the holder is on the row).
\include token_admin.sql
SELECT COALESCE(SUM(open + assigned + resolved + closed), 0)::bigint FROM support_ticket_count;
SELECT id, title, description, status, priority, created_by_id, created_at, updated_at,
       assigned_to_id, assigned_at, version
FROM support_ticket
ORDER BY created_at DESC, id DESC
LIMIT 20;
