# cola-worker image: the worker plus supercronic (cron for containers, as a
# non-root user, with the environment passed through to jobs).
# Not built in CI here (no Docker engine on these machines): see README.
FROM python:3.11-slim

ARG SUPERCRONIC_VERSION=v0.2.29
ARG SUPERCRONIC_SHA1SUM=cd48d45c4b10f3f0bfdd3a57d054cd05ac96812b

RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates \
 && curl -fsSLo /usr/local/bin/supercronic \
      "https://github.com/aptible/supercronic/releases/download/${SUPERCRONIC_VERSION}/supercronic-linux-amd64" \
 && echo "${SUPERCRONIC_SHA1SUM}  /usr/local/bin/supercronic" | sha1sum -c - \
 && chmod 0755 /usr/local/bin/supercronic \
 && apt-get purge -y curl && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY migrations ./migrations
RUN pip install --no-cache-dir ".[postgres]" && rm -rf /app/build

RUN useradd --system --uid 10001 --home-dir /var/lib/cola-worker --create-home cola \
 && install -d -m 0700 -o cola -g cola /var/lib/cola-worker/lock
COPY deploy/crontab /etc/cola-worker/crontab
USER cola
ENV COLA_LOCK_FILE=/var/lib/cola-worker/lock/cola-worker.lock \
    COLA_LOG_FORMAT=json
ENTRYPOINT ["supercronic", "-passthrough-logs", "/etc/cola-worker/crontab"]
