-- Jobs the provider accepted more than once in the last 24 hours (the journal,
-- intentos_envio, has one 'accepted' row per accepted request).
-- A returned row is a message sent twice: job id, how many times accepted.
-- Rows an operator settled by hand (`cola-worker resolve --sent`, origen =
-- 'manual') are not provider acceptances and are not counted; one acceptance
-- journaled twice (same provider message id: a receipt and a replayed answer)
-- counts once.
-- PostgreSQL. Change 24 to widen the window.
WITH params AS (
  SELECT (now() AT TIME ZONE 'UTC') - INTERVAL '24 hours' AS since
)
SELECT i.cola_envio_id AS job,
       COUNT(DISTINCT COALESCE(i.proveedor_msg_id, CONCAT('journal ', i.id))) AS accepted
FROM intentos_envio i, params p
WHERE i.resultado = 'accepted' AND (i.origen IS NULL OR i.origen <> 'manual')
  AND i.inicio_at >= p.since
GROUP BY i.cola_envio_id
HAVING COUNT(DISTINCT COALESCE(i.proveedor_msg_id, CONCAT('journal ', i.id))) > 1
ORDER BY i.cola_envio_id;
