-- Consistency: rows claimed ('procesando') or being sent ('enviando') by a run
-- that is no longer active. `cola-worker recover` (and every run) settles them:
-- 'procesando' back to 'pendiente', 'enviando' to 'incierto'. A returned row
-- that persists means no run has started since the owner died.
-- MariaDB / MySQL 8 and PostgreSQL alike (no time window: any age).
SELECT c.id AS job, c.estado, c.ejecucion_id
FROM cola_envios c
WHERE c.estado IN ('procesando', 'enviando')
  AND (c.ejecucion_id IS NULL
       OR c.ejecucion_id NOT IN (SELECT e.id FROM ejecuciones e WHERE e.estado = 'activa'))
ORDER BY c.id;
