-- Recipients (phone numbers) who received the same content more than once in the last 24 hours
-- (the incident's shape: one reminder queued twice under different keys, both sent).
-- A returned row is a duplicate: the phone number, how many messages, and the job ids.
-- MariaDB / MySQL 8. Change 24 to widen the window.
WITH params AS (
  SELECT UTC_TIMESTAMP(6) - INTERVAL 24 HOUR AS since
)
SELECT w.telefono, COUNT(*) AS messages,
       GROUP_CONCAT(w.cola_envio_id ORDER BY w.cola_envio_id) AS jobs
FROM envios_whatsapp w
JOIN cola_envios c ON c.id = w.cola_envio_id
CROSS JOIN params p
WHERE w.fecha_envio >= p.since
GROUP BY w.telefono, c.payload
HAVING COUNT(*) > 1
ORDER BY w.telefono;
