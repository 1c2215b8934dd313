-- Least-privilege roles for cola-worker on PostgreSQL.
-- Run once as a superuser, connected to the worker's database:
--   createdb cola && psql -d cola -f sql/grants/postgresql.sql
-- Edit first: the database name (cola) and both passwords.
--
-- cola_migrate  runs `cola-worker db upgrade` (Alembic): owns the tables it creates.
-- cola_app      everything else (run, enqueue, status, audit, prune, operator
--               commands): reads and writes rows, never changes the schema.

CREATE ROLE cola_migrate LOGIN PASSWORD 'CHANGE-ME-migrate';
CREATE ROLE cola_app LOGIN PASSWORD 'CHANGE-ME-app';

GRANT CONNECT ON DATABASE cola TO cola_migrate, cola_app;
GRANT USAGE, CREATE ON SCHEMA public TO cola_migrate;
GRANT USAGE ON SCHEMA public TO cola_app;

-- Tables and id sequences that cola_migrate creates from now on.
ALTER DEFAULT PRIVILEGES FOR ROLE cola_migrate IN SCHEMA public
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO cola_app;
ALTER DEFAULT PRIVILEGES FOR ROLE cola_migrate IN SCHEMA public
  GRANT USAGE, SELECT ON SEQUENCES TO cola_app;
