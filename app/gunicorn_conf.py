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
