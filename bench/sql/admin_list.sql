-- admin-list: the admin's token, the count, the first page of 20 with each ticket's holder.
\include token_admin.sql
SELECT count(*) FROM support_ticket;
SELECT t.id, t.title, t.description, t.status, t.priority, t.created_by_id, t.created_at,
       t.updated_at, a.agent_id, a.assigned_at
FROM support_ticket t
LEFT JOIN support_ticketassignment a ON a.ticket_id = t.id AND a.is_active
ORDER BY t.created_at DESC, t.id DESC
LIMIT 20;
