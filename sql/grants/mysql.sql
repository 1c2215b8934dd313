-- Least-privilege users for cola-worker on MariaDB / MySQL 8.
-- Run once as an administrator: mysql -u root < sql/grants/mysql.sql
-- Edit first: the database name (`cola`), the host part ('%') and both passwords.
--
-- cola_migrate  runs `cola-worker db upgrade` (Alembic): creates and alters the tables.
-- cola_app      everything else (run, enqueue, status, audit, prune, operator
--               commands): reads and writes rows, never changes the schema.

CREATE DATABASE IF NOT EXISTS `cola` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci;

CREATE USER IF NOT EXISTS 'cola_migrate'@'%' IDENTIFIED BY 'CHANGE-ME-migrate';
GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, DROP, INDEX, REFERENCES
  ON `cola`.* TO 'cola_migrate'@'%';

CREATE USER IF NOT EXISTS 'cola_app'@'%' IDENTIFIED BY 'CHANGE-ME-app';
GRANT SELECT, INSERT, UPDATE, DELETE ON `cola`.* TO 'cola_app'@'%';
