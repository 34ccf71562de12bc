# Untested here (no Docker engine on the development machines); kept deliberately plain.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HOST=0.0.0.0 PORT=8080 INSTANCE_PATH=/var/lib/gateway

WORKDIR /srv/gateway
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY app ./app
COPY cds_services ./cds_services

RUN useradd --system --uid 10001 --home-dir /var/lib/gateway --create-home gateway
USER gateway

EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/healthz', timeout=2)"

CMD ["sh", "-c", "flask --app app db upgrade && exec gunicorn -c app/gunicorn_conf.py 'app:create_app()'"]
