-- Rows 'incierto' (the provider may or may not have accepted them), oldest
-- first, with their age and the last error. Not a failure by itself: each
-- waits for an operator (`cola-worker resolve`, or `requeue --accept-duplicate-risk`).
-- PostgreSQL.
SELECT c.id AS job, c.sesion_id,
       CAST(EXTRACT(EPOCH FROM (now() AT TIME ZONE 'UTC') - c.actualizado_at) AS BIGINT) AS age_seconds,
       c.error_codigo, c.error_texto
FROM cola_envios c
WHERE c.estado = 'incierto'
ORDER BY c.actualizado_at, c.id;
