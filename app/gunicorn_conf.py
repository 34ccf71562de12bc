"""gunicorn settings for `make run` and the Docker image; every value can be overridden from the environment.

gthread workers: hooks wait on the network (FHIR fill-in, remote models), so threads, not processes, carry the
concurrency. Threads per worker must cover the keep-alive connections a worker may hold, because a connection
stays with the worker that accepted it.
"""

import sys
from pathlib import Path

from app.config import ConfigError, load_config
from app.development import bind_spelling, off_host_refusal
from app.metrics import prepare_multiprocess_dir
from app.private_files import private_file

try:
    _settings = load_config()  # once, in the master, before any worker: a bad setting is one line, exit status 2
except ConfigError as _error:
    print(f"gateway: not starting: {_error}", file=sys.stderr)
    sys.exit(2)

bind = f"{_settings['HOST']}:{_settings['PORT']}"
worker_class = "gthread"
workers = _settings["WEB_CONCURRENCY"]
threads = _settings["GUNICORN_THREADS"]
keepalive = 5
# A client JWT may be 16,384 characters (app/cds/auth.py); gunicorn's default 8,190 would answer a long one with its
# own 431 page instead of our 401.
limit_request_field_size = 20_000
timeout = 30
graceful_timeout = 20
accesslog = _settings["ACCESS_LOG"]  # off by default: keep logs lean; "-" for standard output
if accesslog and accesslog != "-":
    private_file(Path(accesslog))  # callers' addresses and paths: the service's alone, whatever gunicorn's umask
# Path without the query string: a SMART callback's query carries the authorization code.
access_log_format = '%(h)s %(t)s "%(m)s %(U)s" %(s)s %(B)s %(L)ss'
errorlog = "-"
# gunicorn's runtime control socket defaults to one path per user (~/.gunicorn), which several gateways on a host
# would share and a container's user may not be able to create; we manage processes by signals alone.
control_socket_disable = True
loglevel = _settings["LOG_LEVEL"].lower()

# Prometheus metrics of every process of this host (gunicorn workers, job workers), summed at /metrics: each writes
# files in INSTANCE_PATH/metrics/pidns-<id>; set here in the master, before it forks a worker.
prepare_multiprocess_dir(_settings["INSTANCE_PATH"])


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_starting(server):
    """Settings given to gunicorn itself (GUNICORN_CMD_ARGS, the command line) are checked as ours are."""
    for name, value in (("workers", server.cfg.workers), ("threads", server.cfg.threads)):
        if value < 1:
            _refuse(server, f"gunicorn {name} must be at least 1 (got {value}; see WEB_CONCURRENCY, GUNICORN_THREADS)")


def when_ready(server):
    """Development-only settings work only on loopback: check the addresses gunicorn actually listens on, which
    --bind, GUNICORN_CMD_ARGS or an inherited socket may have set apart from HOST (each worker checks its own
    sockets again when it loads the application, app/development.py)."""
    refusal = off_host_refusal(_settings, [bind_spelling(listener.sock.getsockname()) for listener in server.LISTENERS])
    if refusal:
        _refuse(server, refusal)


def _refuse(server, message: str):
    import sys

    server.log.error("not starting: %s", message)
    sys.exit(2)
