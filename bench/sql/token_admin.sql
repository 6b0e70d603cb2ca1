-- The admin's token: key hash -> user, expiry, active, staff.
SELECT t.user_id, t.expires_at, u.is_active, u.is_staff
FROM support_apitoken t JOIN auth_user u ON u.id = t.user_id
WHERE t.key_hash = encode(sha256(convert_to(lpad(CAST(:admin_id AS text), 40, '0'), 'UTF8')), 'hex');
