-- The agent's token: key hash -> user, expiry, active, in the agents group.
SELECT t.user_id, t.expires_at, u.is_active,
       EXISTS (SELECT 1 FROM auth_user_groups ug JOIN auth_group g ON g.id = ug.group_id
               WHERE ug.user_id = t.user_id AND g.name = 'agents') AS is_agent
FROM support_apitoken t JOIN auth_user u ON u.id = t.user_id
WHERE t.key_hash = encode(sha256(convert_to(lpad(CAST(:agent_id AS text), 40, '0'), 'UTF8')), 'hex');
