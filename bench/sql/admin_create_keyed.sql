-- admin-create-keyed: the admin's token, then the keyed create (keyed_create.sql) with a new
-- key per transaction.
\include token_admin.sql
\set key_no :key_no + 1
\include keyed_create.sql
