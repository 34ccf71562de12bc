# The clinical AI gateway: one image for the web server, the job workers, migrations and key generation.
#
#   docker build -t clinical-ai-gateway .          (podman: podman build --format docker --pull=never ...)
#   docker run IMAGE migrate | keys | serve | worker | <any gateway command>     (deploy/entrypoint.sh)
#
# Built and run by tests/e2e/test_container.py with podman. Runtime dependencies only (requirements.txt): no test
# tools, no pip in the application's environment; runs as an unprivileged user.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# The application's own environment, without pip: the base image's pip installs into it (pip --python).
RUN python -m venv --without-pip /opt/gateway
WORKDIR /src
COPY requirements.txt ./
RUN pip --python /opt/gateway/bin/python install --no-compile -r requirements.txt
COPY pyproject.toml ./
COPY app ./app
COPY cds_services ./cds_services
# The project itself (the `gateway` command), then bytecode compiled once here: the runtime user cannot write it.
# Checked by import only: running a command would make an application, and with it instance files and a key.
RUN pip --python /opt/gateway/bin/python install --no-compile --no-deps . \
    && /opt/gateway/bin/python -m compileall -q -j 0 /opt/gateway/lib \
    && /opt/gateway/bin/python -c "import app.cli, cds_services"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="clinical-ai-gateway" \
      org.opencontainers.image.description="CDS Hooks 2.0 gateway: web server, job worker, migrations, keys"
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    INSTANCE_PATH=/var/lib/gateway \
    KEYS_DIR=/var/lib/gateway/keys
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/gateway --no-create-home \
       --shell /usr/sbin/nologin gateway \
    && install -d -o gateway -g gateway -m 0700 /var/lib/gateway /var/lib/gateway/keys
COPY --from=builder /opt/gateway /opt/gateway
COPY --chmod=0755 deploy/entrypoint.sh /usr/local/bin/gateway-entrypoint

USER gateway:gateway
WORKDIR /var/lib/gateway
# Instance data (host state, metrics files, the audit log) and, unless KEYS_DIR points at a mounted secret, the
# keys. keys/ exists so that a named volume mounted there starts out owned by the image's user.
VOLUME ["/var/lib/gateway"]
EXPOSE 8080
# Liveness of the web server; over loopback, so a TLS certificate (gunicorn --certfile) naming the public host is
# not verified. Set HEALTHCHECK_URL when serving https. Worker containers have no HTTP: disable it there.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request; urllib.request.urlopen(os.environ.get('HEALTHCHECK_URL') or 'http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=4, context=ssl._create_unverified_context())"]
ENTRYPOINT ["gateway-entrypoint"]
CMD ["serve"]
