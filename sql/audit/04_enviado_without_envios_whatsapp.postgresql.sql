-- Consistency: rows marked 'enviado' (changed in the last 24 hours) that have no
-- accepted-send row in envios_whatsapp. Every accepted send writes both in one
-- transaction, so a returned row means someone edited the tables by hand.
-- PostgreSQL. Change 24 to widen the window.
WITH params AS (
  SELECT (now() AT TIME ZONE 'UTC') - INTERVAL '24 hours' AS since
)
SELECT c.id AS job
FROM cola_envios c
LEFT JOIN envios_whatsapp w ON w.cola_envio_id = c.id
CROSS JOIN params p
WHERE c.estado = 'enviado' AND w.id IS NULL AND c.actualizado_at >= p.since
ORDER BY c.id;
