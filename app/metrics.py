"""Prometheus metrics at /metrics, aggregated across the processes of a host when PROMETHEUS_MULTIPROC_DIR is set.

Every serving process of a host (the gunicorn master before it forks its workers, and each job worker) calls
``prepare_multiprocess_dir(INSTANCE_PATH)`` first: they then all write their metrics to files in a directory
under ``INSTANCE_PATH/metrics``, and /metrics on any gunicorn worker sums them, the job workers' counters
included. prometheus_client names each file by process id, so the directory is one per PID namespace
(``metrics/pidns-<id>``): containers that share an INSTANCE_PATH volume, each with its own process ids, never
write to one file, remove each other's files as those of exited processes, or count each other's metrics.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_DIR = "metrics"  # under INSTANCE_PATH
RESERVED_FILE_BYTES = 1 << 20  # each metrics file of a process; a few per process
# prometheus_client's files: <type>_<pid>.db, and gauge_<mode>_<pid>.db
_PROCESS_FILE = re.compile(r"^[a-z]+(?:_[a-z]+)?_(?P<pid>[0-9]+)\.db$")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)

AI_CALLS = Counter("gateway_ai_calls_total", "Model calls through the guard, by outcome", ["model", "outcome"])
AI_CALL_SECONDS = Histogram(
    "gateway_ai_call_seconds", "Duration of model calls that reached the backend", ["model"], buckets=LATENCY_BUCKETS
)
FALLBACKS = Counter("gateway_fallbacks_total", "Fallback cards served, by service and reason", ["service", "reason"])
BREAKER_STATE = Gauge(
    "gateway_breaker_state",
    "Circuit breaker state seen by this process: 0 closed, 1 half-open, 2 open",
    ["breaker"],
    multiprocess_mode="max",
)
BREAKER_TRANSITIONS = Counter(
    "gateway_breaker_transitions_total", "Circuit breaker state changes", ["breaker", "from_state", "to_state"]
)
HOOK_SECONDS = Histogram(
    "gateway_hook_seconds",
    "Hook call duration, end to end in the service",
    ["service", "outcome"],
    buckets=LATENCY_BUCKETS,
)
RESULTS_NOT_STORED = Counter(
    "gateway_results_not_stored_total",
    "Explanation results not stored, by reason. The card went out without its link for unstorable, queue-full "
    "and database-unreachable; its link points at nothing for rejected and lost-at-exit (and says 'expired' for "
    "expired)",
    ["reason"],
)

bp = Blueprint("metrics", __name__)
_SCRAPE_COLLECTORS = "metrics.scrape_collectors"  # app.extensions: name -> factory(app) of a Collector


@bp.get("/metrics")
def metrics():
    """The Prometheus text format; with several workers, the sum over all of them; then what the areas read at
    scrape time (``collect_at_scrape``: the job gauges from the ledger)."""
    token = current_app.config["METRICS_TOKEN"]
    if token and not _bearer_matches(request.headers.get("Authorization"), token):
        return Response("metrics need Authorization: Bearer $METRICS_TOKEN\n", 401, {"WWW-Authenticate": "Bearer"})

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest()
    at_scrape = CollectorRegistry()
    for factory in current_app.extensions.get(_SCRAPE_COLLECTORS, {}).values():
        at_scrape.register(factory(current_app))
    return Response(body + generate_latest(at_scrape), content_type=CONTENT_TYPE_LATEST)


def collect_at_scrape(app: Flask, name: str, factory: Callable[[Flask], Collector]) -> None:
    """Add ``factory(app)``'s metrics to every scrape of /metrics: values read then (e.g. from the database, the
    same in every process) rather than kept by this process. ``name`` makes adding it again a no-op."""
    app.extensions.setdefault(_SCRAPE_COLLECTORS, {})[name] = factory


def serve_process_metrics(host: str, port: int, token: str | None) -> ThreadingWSGIServer:
    """This process's own metrics at http://host:port/metrics on a daemon thread (a job worker in a container of
    its own), behind the same bearer token as the gateway's /metrics when ``token`` is set; the server, to shut
    down. OSError when the address cannot be bound."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    server = make_server(host, port, _token_required(make_wsgi_app(), token), server_class, _QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True).start()
    return server


def _token_required(wsgi_app: Callable, token: str | None) -> Callable:
    """``wsgi_app`` answering only requests that carry ``Authorization: Bearer <token>`` (all, without a token)."""

    def guarded(environ, start_response):
        if token and not _bearer_matches(environ.get("HTTP_AUTHORIZATION"), token):
            start_response("401 Unauthorized", [("WWW-Authenticate", "Bearer"), ("Content-Type", "text/plain")])
            return [b"metrics need Authorization: Bearer $METRICS_TOKEN\n"]
        return wsgi_app(environ, start_response)

    return guarded


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        """No line per scrape on standard error."""


def _bearer_matches(header: str | None, token: str) -> bool:
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def prepare_multiprocess_dir(instance_path: str | Path) -> Path:
    """Make this process write its metrics where every process of the host does: PROMETHEUS_MULTIPROC_DIR when
    the environment sets it, else this PID namespace's directory under ``INSTANCE_PATH/metrics`` (made 0700),
    and the environment variable set to it for the processes this one starts. Files of processes that are no
    longer running are removed first. Returns the directory.

    Call it before any metric is recorded (best: before anything imports prometheus_client); when that already
    happened, metrics recorded from now on are written to the directory, those recorded before are not."""
    preset = os.environ.get(MULTIPROC_ENV)
    directory = Path(preset) if preset else _namespace_dir(Path(instance_path) / METRICS_DIR)
    for folder in (directory,) if preset else (Path(instance_path), directory.parent, directory):
        if not folder.is_dir():  # the instance folder too: private (app.db) from the first process that makes it
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask
    removed = remove_dead_process_files(directory)
    if removed:
        log.info("metrics: removed %d files of processes no longer running from %s", removed, directory)
    os.environ[MULTIPROC_ENV] = str(directory)
    from prometheus_client import values

    values.MmapedDict = ReservedMetricsFile  # the class its values open their files with
    if not getattr(values.ValueClass, "_multiprocess", False):  # imported before the variable was set
        values.ValueClass = values.get_value_class()
    return directory


class ReservedMetricsFile(MmapedDict):
    """prometheus_client's per-process metrics file, its disk blocks reserved when it is opened. Values are written
    through a memory map, and a write to a page that has no block yet on a full disk is SIGBUS: every gunicorn
    worker died of it instead of answering 503. Where even the reservation fails, the file is kept in memory: the
    process keeps answering, its metrics missing from /metrics (logged). Past RESERVED_FILE_BYTES (some 4,000
    series of one type in one process) prometheus_client grows the file without reserving."""

    def __init__(self, filename: str, read_mode: bool = False):
        super().__init__(filename if read_mode else _reserved(filename), read_mode)


def _reserved(filename: str) -> str:
    """``filename`` with RESERVED_FILE_BYTES of disk allocated, or a file in memory when the disk has no room."""
    if not hasattr(os, "posix_fallocate"):  # not Linux (a developer's Mac): as prometheus_client has it
        return filename
    fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, RESERVED_FILE_BYTES)
        return filename
    except OSError as exc:
        os.unlink(filename)  # a short file would break every other process's /metrics
        log.error("metrics: no room for %s (%s): this process's metrics are kept in memory only", filename, exc)
        return f"/proc/self/fd/{os.memfd_create(Path(filename).name)}"  # open for the life of the process
    finally:
        os.close(fd)


def remove_dead_process_files(directory: str | Path) -> int:
    """Delete the metric files of processes of this host that have exited; returns how many went. (A crashed
    process's counters would otherwise stay in every sum until its pid is reused, and pile up file by file.)"""
    removed = 0
    for path in Path(directory).glob("*.db"):
        match = _PROCESS_FILE.match(path.name)
        if match and not _running(int(match["pid"])):
            with contextlib.suppress(FileNotFoundError):  # another process starting cleaned it up first
                path.unlink()
                removed += 1
    return removed


def mark_process_dead(pid: int | None = None) -> None:
    """At a process's clean exit: drop its live-only gauges (prometheus_client's own bookkeeping)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(os.getpid() if pid is None else pid)


def _namespace_dir(base: Path) -> Path:
    """``base/pidns-<id>`` for this process's PID namespace (shared by the processes of a host or a container);
    ``base`` itself where the namespace cannot be read (not Linux)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return base
    return base / f"pidns-{namespace.removeprefix('pid:[').removesuffix(']')}"


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def init_app(app) -> None:
    app.register_blueprint(bp)
