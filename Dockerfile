# ringsync node image: one `ringsync run` per container.
#
#   docker build -t ringsync .
#   docker run --init -p 8770:8770 -v ringsync-data:/var/lib/ringsync \
#       -e RINGRIFT_NODE_ID=train-1 -e RINGRIFT_CLUSTER_CONFIG=/etc/ringsync/hosts.yaml \
#       -e RINGRIFT_CLUSTER_AUTH_TOKEN_FILE=/etc/ringsync/token -v /etc/ringsync:/etc/ringsync:ro \
#       ringsync run --profile training
#
# --init (or tini) reaps the ssh processes rsync leaves behind; ringsync itself handles SIGTERM.
# Every RINGRIFT_* variable is documented in .env.example.
FROM python:3.11-slim

# Debian's security archive moves package versions under us, so pins would break rebuilds;
# the base tag pins the release (bookworm) instead.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openssh-client rsync aria2 \
    && rm -rf /var/lib/apt/lists/*

# A numeric non-root user that also exists in /etc/passwd: ssh refuses to run for a uid
# without a passwd entry, and Kubernetes' runAsNonRoot needs the number in USER.
RUN groupadd --system --gid 10001 ringsync \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/ringsync \
        --no-create-home --shell /usr/sbin/nologin ringsync \
    && install -d -m 0750 -o 10001 -g 10001 /var/lib/ringsync

WORKDIR /src
COPY pyproject.toml README.md ./
COPY ringsync/ ringsync/
COPY daemons/ daemons/
RUN pip install --no-cache-dir . && rm -rf /src

ENV PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=1 \
    RINGRIFT_DATA_DIR=/var/lib/ringsync \
    RINGRIFT_P2P_HOST=0.0.0.0 \
    RINGRIFT_P2P_PORT=8770
VOLUME ["/var/lib/ringsync"]
WORKDIR /var/lib/ringsync
EXPOSE 8770
USER 10001:10001

# 503 (a daemon failed) and connection errors both make urlopen raise: exit 1, unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('RINGRIFT_P2P_PORT', '8770') + '/healthz', timeout=4)"]

ENTRYPOINT ["ringsync"]
CMD ["run"]
