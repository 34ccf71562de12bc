"""gunicorn settings for `make run` and the Docker image; every value can be overridden from the environment.

gthread workers: hooks wait on the network (FHIR fill-in, remote models), so threads, not processes, carry the
concurrency. Threads per worker must cover the keep-alive connections a worker may hold, because a connection
stays with the worker that accepted it.
"""

import os

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8080')}"
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "16"))
keepalive = 5
# A client JWT may be 16,384 characters (app/cds/auth.py); gunicorn's default 8,190 would answer a long one with its
# own 431 page instead of our 401.
limit_request_field_size = 20_000
timeout = 30
graceful_timeout = 20
accesslog = os.environ.get("ACCESS_LOG") or None  # off by default: keep logs lean
# Path without the query string: a SMART callback's query carries the authorization code.
access_log_format = '%(h)s %(t)s "%(m)s %(U)s" %(s)s %(B)s %(L)ss'
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()

# Prometheus metrics from every worker, summed at /metrics: each worker writes to files in this directory.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    import tempfile

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gateway-metrics-")


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_starting(server):
    """Check the settings once, in the master, before any worker: one line naming the variable, exit status 2."""
    from app.config import ConfigError, load_config

    try:
        load_config()
    except ConfigError as exc:
        _refuse(server, str(exc))


def when_ready(server):
    """Development-only settings work only on loopback: check the addresses gunicorn actually listens on, which
    --bind, GUNICORN_CMD_ARGS or an inherited socket may have set apart from HOST."""
    from app.config import load_config
    from app.development import off_host_refusal

    refusal = off_host_refusal(load_config(), [_listening_on(listener) for listener in server.LISTENERS])
    if refusal:
        _refuse(server, refusal)


def _listening_on(listener) -> str:
    address = listener.sock.getsockname()
    if isinstance(address, tuple):
        return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"
    return f"unix:{address}"


def _refuse(server, message: str):
    import sys

    server.log.error("not starting: %s", message)
    sys.exit(2)
