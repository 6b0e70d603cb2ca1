-- admin-create-replay: the admin's token, then the stored answer of the client's one key
-- (:key_no stays 0), which its first transaction stores with the keyed create. One read: a
-- stored answer is never changed, only removed once expired, so it needs no lock.
\include token_admin.sql
\if :phase = 0
\include keyed_create.sql
\set phase 1
\else
SELECT status, body, headers, fingerprint
FROM support_idempotency_key
WHERE user_id = CAST(:admin_id AS int)
  AND key = format('bench-%s-%s-%s', CAST(:run AS bigint), CAST(:client_id AS int),
                   CAST(:key_no AS bigint))
  AND expires_at > now();
\endif
