# edgeproxy container image. Build: docker build -t edgeproxy .
# Run (state in a named volume; the public ports are high inside the container, mapped to 80/443):
#   docker run -d --name edgeproxy -p 80:8080 -p 443:8443 -v edgeproxy-state:/var/lib/edgeproxy \
#     -e EDGEPROXY_UPSTREAM_SCRIPT=https://... -e EDGEPROXY_UPSTREAM_RELAY=https://... \
#     -e EDGEPROXY_DNS_CNAME_TARGET=edge.your-neutral-domain.net edgeproxy
# The admin API stays on the container's loopback: use `docker exec edgeproxy edgeproxy domains add ...`.
# See docs/runbook.md.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
# The dependencies come from the runtime lock only: exact pins, every file checked against
# its hash (make lock; for CPython 3.11 on Linux). The venv is copied whole into the
# final stage, so it has the same path in both.
COPY requirements.lock ./
RUN python -m venv /opt/edgeproxy \
 && /opt/edgeproxy/bin/pip install --no-cache-dir --require-hashes -r requirements.lock
# Then the project's own wheel: --no-deps fetches nothing beyond the lock, and
# --no-build-isolation builds it with the locked setuptools instead of fetching one.
COPY pyproject.toml README.md ./
COPY edgeproxy ./edgeproxy
RUN /opt/edgeproxy/bin/pip install --no-cache-dir --no-deps --no-build-isolation .

FROM python:3.11-slim-bookworm
# A fixed numeric uid/gid so that volume ownership and runAsNonRoot policies are predictable.
RUN groupadd --system --gid 10001 edgeproxy \
 && useradd --system --uid 10001 --gid edgeproxy --home-dir /var/lib/edgeproxy --shell /usr/sbin/nologin edgeproxy \
 && install -d -o edgeproxy -g edgeproxy -m 0700 /var/lib/edgeproxy
COPY --from=build /opt/edgeproxy /opt/edgeproxy
ENV PATH=/opt/edgeproxy/bin:$PATH

# High ports inside the container: the non-root user needs no CAP_NET_BIND_SERVICE
# (works with --cap-drop ALL); publish them as 80 and 443 on the host.
# All state (SQLite store with keys and certificates, the admin tokens) lives in the volume.
# DL3064 flags the word TOKEN in variable names: these hold paths; the tokens are
# created in the volume (0600) and never enter the image.
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    EDGEPROXY_LISTEN_HTTP=[::]:8080 \
    EDGEPROXY_LISTEN_HTTPS=[::]:8443 \
    EDGEPROXY_LISTEN_ADMIN=127.0.0.1:8081 \
    EDGEPROXY_STORAGE_URL=sqlite:///var/lib/edgeproxy/edgeproxy.db \
    EDGEPROXY_ADMIN_TOKEN_FILE=/var/lib/edgeproxy/admin-token \
    EDGEPROXY_ADMIN_TOKENS_FILE=/var/lib/edgeproxy/admin-tokens.json
VOLUME ["/var/lib/edgeproxy"]
EXPOSE 8080 8443
USER 10001:10001
WORKDIR /var/lib/edgeproxy

# /healthz answers 200 when the process is up and its store is readable; it runs
# inside the container, so it reaches the loopback-only admin listener.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://' + os.environ['EDGEPROXY_LISTEN_ADMIN'] + '/healthz', timeout=4)"]

# Exec form: edgeproxy is PID 1 and receives SIGTERM from `docker stop` directly;
# `serve` stops its listeners and worker processes on SIGTERM.
STOPSIGNAL SIGTERM
ENTRYPOINT ["edgeproxy"]
CMD ["serve"]
