# cola-worker image: the worker and its own foreground scheduler.
#
# The entrypoint `cola-worker schedule` starts `cola-worker run` every minute
# as a child and forwards SIGTERM to it, so `docker stop` drains the running
# run (stops claiming, finishes and records what is in flight, releases the
# rest) within compose's stop_grace_period. No cron binary is downloaded: the
# image builds on every architecture python:3.11-slim has (amd64, arm64, ...):
#   docker buildx build --platform linux/amd64,linux/arm64 -t cola-worker .
# Not built in CI here (no Docker engine on these machines): tests run the
# entrypoint command as a real process tree instead (tests/acceptance/test_deploy.py).
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY migrations ./migrations
RUN pip install --no-cache-dir ".[postgres]" && rm -rf /app/build

RUN useradd --system --uid 10001 --home-dir /var/lib/cola-worker --create-home cola \
 && install -d -m 0700 -o cola -g cola /var/lib/cola-worker/lock \
 && install -d -m 0755 -o cola -g cola /data
USER cola
ENV COLA_LOCK_FILE=/var/lib/cola-worker/lock/cola-worker.lock \
    COLA_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
STOPSIGNAL SIGTERM
ENTRYPOINT ["cola-worker", "schedule"]
