-- Consistency: accepted sends (envios_whatsapp, last 24 hours) whose row is not
-- 'enviado'. A returned row was accepted by the provider but its row says
-- otherwise (e.g. requeued by hand after it was sent): check it before it is sent again.
-- PostgreSQL. Change 24 to widen the window.
WITH params AS (
  SELECT (now() AT TIME ZONE 'UTC') - INTERVAL '24 hours' AS since
)
SELECT w.cola_envio_id AS job, c.estado
FROM envios_whatsapp w
JOIN cola_envios c ON c.id = w.cola_envio_id
CROSS JOIN params p
WHERE c.estado <> 'enviado' AND w.fecha_envio >= p.since
ORDER BY w.cola_envio_id;
