"""The parts of ``bench.ledger_depth``: a backlog of canary jobs inserted in bulk, the gateway and its job workers
as processes, the hook clients (their own process), and the SQLite write-lock probe (its own process)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import requests
import sqlalchemy as sa

from app.jobs import ledger
from app.jobs.canary import CANARY
from app.jobs.registry import job_kind

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # this checkout's, or another's run with this venv
FIXTURE = ROOT / "fixtures" / "hooks" / "patient-view-cardiovascular-risk.json"
DISCHARGE = "/cds-services/discharge-summary"
PATIENT_VIEW = "/cds-services/cardiovascular-risk"
FHIR_SERVER = "http://127.0.0.1:9/fhir"  # on the allowlist, never called: the hook only enqueues
BATCH = 20_000


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# The backlog


class Backlog:
    """No-op canary jobs, queued and due now, written as ``ledger.enqueue`` writes them but in big batches.

    One job is enqueued through the ledger; its row is the template for every other one (only the id and the
    times differ), so columns the ledger sets are copied whatever they are. PostgreSQL gets COPY, SQLite one
    executemany per batch, with the values converted by the table's own column types."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine
        self.added = 0
        declared = job_kind(CANARY)
        ledger.enqueue(engine, self._next_id(), CANARY, {}, max_attempts=declared.retry.attempts({}))
        with engine.connect() as conn:
            row = conn.execute(sa.select(ledger.jobs).where(ledger.jobs.c.id == self._id(0))).one()
        self.template = dict(row._mapping)
        self.columns = list(self.template)

    def _id(self, n: int) -> str:
        return f"bench-canary-{n:08d}"

    def _next_id(self) -> str:
        self.added += 1
        return self._id(self.added - 1)

    def add(self, n: int) -> None:
        """Insert ``n`` more jobs, due now, in batches of ``BATCH`` (memory stays bounded at any backlog)."""
        while n > 0:
            size = min(n, BATCH)
            self._insert_batch(size)
            n -= size

    def _processed(self) -> list:
        """The template row for this batch (times: now) as the driver receives it."""
        now = datetime.now(UTC)
        values = {**self.template, "run_after": now, "created_at": now, "updated_at": now}
        dialect = self.engine.dialect
        out = []
        for name in self.columns:
            process = ledger.jobs.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            out.append(process(values[name]) if process else values[name])
        return out

    def _rows(self, size: int) -> Iterator[tuple]:
        template = self._processed()
        at = self.columns.index("id")
        for _ in range(size):
            template[at] = self._next_id()
            yield tuple(template)

    def _insert_batch(self, size: int) -> None:
        names = ", ".join(self.columns)
        raw = self.engine.raw_connection()
        try:
            driver = raw.driver_connection
            if self.engine.dialect.name == "postgresql":
                with driver.cursor() as cur, cur.copy(f"COPY {ledger.jobs.name} ({names}) FROM STDIN") as copy:
                    for row in self._rows(size):
                        copy.write_row(row)
            else:
                marks = ", ".join("?" for _ in self.columns)
                driver.executemany(f"INSERT INTO {ledger.jobs.name} ({names}) VALUES ({marks})", self._rows(size))
            driver.commit()
        finally:
            raw.close()


def finished_count(engine: sa.Engine) -> int:
    """Jobs succeeded so far (only canaries run): served by the (state, ...) index, cheap while the queue is deep."""
    query = sa.select(sa.func.count()).select_from(ledger.jobs).where(ledger.jobs.c.state == ledger.SUCCEEDED)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar())


class TopUp(threading.Thread):
    """Keeps the canary backlog at its depth while workers drain it: every ``every`` seconds, as many new jobs as
    finished since the last look (one batch, one short write). Also the drain clock: (monotonic time, finished)."""

    def __init__(self, backlog: Backlog, enabled: bool, every: float = 0.5):
        super().__init__(name="top-up", daemon=True)
        self.backlog, self.enabled, self.every = backlog, enabled, every
        self.stop = threading.Event()
        self.topped_up = 0
        self.samples: list[tuple[float, int]] = []
        self.lock_timeouts = 0  # top-ups that gave up after SQLite's busy timeout (15 s): tried again next time
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                finished = finished_count(self.backlog.engine)
                self.samples.append((time.monotonic(), finished))
                if self.enabled and finished > self.topped_up:
                    self._top_up(finished - self.topped_up)
                self.stop.wait(self.every)
        except BaseException as exc:  # noqa: BLE001 - reported by the row, not lost in a thread
            self.error = exc

    def _top_up(self, n: int) -> None:
        try:
            self.backlog.add(n)
        except (sqlite3.OperationalError, sa.exc.OperationalError) as exc:
            if "locked" not in str(exc):
                raise
            self.lock_timeouts += 1
            return
        self.topped_up += n

    def finished_at(self, moment: float) -> float:
        """Finished count at ``moment``, interpolated between the samples around it."""
        before = [s for s in self.samples if s[0] <= moment]
        after = [s for s in self.samples if s[0] >= moment]
        if not before or not after:
            edge = (before or after)[-1 if before else 0]
            return float(edge[1])
        (t0, n0), (t1, n1) = before[-1], after[0]
        return float(n0) if t1 == t0 else n0 + (n1 - n0) * (moment - t0) / (t1 - t0)


# ---------------------------------------------------------------------------------------------------------------
# Processes: the gateway under gunicorn, and job workers


def _spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            args, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=log, start_new_session=True
        )


def stop_process(proc: subprocess.Popen, timeout: float = 40) -> None:
    """SIGTERM its process group (it has its own session); SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def start_gateway(env: dict[str, str], port: int, log_path: Path, startup_seconds: float = 60) -> subprocess.Popen:
    """gunicorn with app/gunicorn_conf.py (as tests/support/processes.gunicorn, with this interpreter's venv)."""
    proc = _spawn(
        [str(VENV_BIN / "gunicorn"), "-c", "app/gunicorn_conf.py", "app:create_app()"],
        {**env, "PORT": str(port), "HOST": "127.0.0.1"},
        log_path,
    )
    deadline = time.monotonic() + startup_seconds
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError(f"gunicorn did not become healthy; see {log_path}")
        time.sleep(0.2)


def start_worker(env: dict[str, str], log_path: Path, *args: str, holds_path: Path | None = None) -> subprocess.Popen:
    """``flask --app app jobs worker`` (as tests/support/processes.start_worker, with this interpreter's venv);
    with ``holds_path``, the same command run by ``instrumented_worker``, which times its write transactions."""
    command = ["--app", "app", "jobs", "worker", *args]
    if holds_path is None:
        return _spawn([str(VENV_BIN / "flask"), *command], env, log_path)
    return _spawn([sys.executable, "-m", "bench.ledger_depth_parts", str(holds_path), *command], env, log_path)


def scrape_metrics(base: str) -> float:
    """One /metrics scrape; its wall time in ms. Raises unless the ledger gauges were read."""
    started = time.perf_counter()
    answer = requests.get(f"{base}/metrics", timeout=60)
    elapsed = (time.perf_counter() - started) * 1000
    answer.raise_for_status()
    if "gateway_jobs_ledger_up 1.0" not in answer.text:
        raise RuntimeError("/metrics could not read the job ledger")
    return elapsed


# ---------------------------------------------------------------------------------------------------------------
# Hook clients (run in their own process: ``run_hook_load``)


def discharge_body() -> dict:
    """An encounter-discharge call for a new encounter, so every call enqueues a new job."""
    return {
        "hookInstance": str(uuid.uuid4()),
        "hook": "encounter-discharge",
        "fhirServer": FHIR_SERVER,
        "context": {
            "userId": "Practitioner/bench-1",
            "patientId": "bench-patient",
            "encounterId": f"bench-{uuid.uuid4().hex}",
        },
    }


def _client(base, key, path, body, rate, go_at, stop_at, out):
    """One client: call ``path`` at most ``rate`` times a second (0: back to back) until ``stop_at``; record each
    call's latency from sending to the whole answer (signing the JWT is done before the clock starts)."""
    session = requests.Session()
    fixed = json.dumps(body).encode() if body is not None else None
    period = 1 / rate if rate else 0.0
    next_at = go_at
    while True:
        now = time.monotonic()
        if now >= stop_at:
            return
        if next_at > now:
            time.sleep(min(next_at, stop_at) - now)
            continue
        next_at = max(next_at + period, now)  # after a slow call, go on at once but never in a burst
        data = fixed if fixed is not None else json.dumps(discharge_body()).encode()
        headers = {"Authorization": f"Bearer {key.token(base + path)}", "Content-Type": "application/json"}
        started = time.perf_counter()
        try:
            answer = session.post(base + path, data=data, headers=headers, timeout=60)
            outcome = _outcome(path, answer)
        except requests.RequestException as exc:
            outcome = type(exc).__name__
        out.append(((time.perf_counter() - started) * 1000, outcome))


def _outcome(path: str, answer: requests.Response) -> str:
    """ "ok", the HTTP status, or "no card"; a discharge answer is ok only when it says a draft is being prepared
    (the job was enqueued)."""
    if answer.status_code != 200:
        return str(answer.status_code)
    cards = answer.json().get("cards") or []
    if not cards:
        return "no card"
    summary = cards[0].get("summary", "")
    return "ok" if path != DISCHARGE or "being prepared" in summary else f"card: {summary}"


def run_hook_load(spec: dict, ready, go, out_path: str) -> None:
    """Process entry: ``spec['discharge_clients']`` discharge clients and ``spec['control_clients']`` patient-view
    clients, for ``spec['seconds']`` after ``go`` is set; latencies (ms) and failures to ``out_path`` as JSON."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from tests.support.tokens import SigningKey

    key = SigningKey(load_pem_private_key(spec["key_pem"].encode(), None), spec["kid"], "ES384")
    control = json.loads(FIXTURE.read_text())
    ready.set()
    go.wait()
    go_at = time.monotonic()
    stop_at = go_at + spec["seconds"]
    results: dict[str, list] = {DISCHARGE: [], PATIENT_VIEW: []}
    plan = [(DISCHARGE, None)] * spec["discharge_clients"] + [(PATIENT_VIEW, control)] * spec["control_clients"]
    threads = [
        threading.Thread(
            target=_client, args=(spec["base"], key, path, body, spec["rate"], go_at, stop_at, results[path])
        )
        for path, body in plan
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    Path(out_path).write_text(json.dumps(results))


def summarise_calls(calls: list[tuple[float, str]], budget_ms: float) -> dict:
    times = [ms for ms, _ in calls]
    failures = Counter(outcome for _, outcome in calls if outcome != "ok")
    return {
        "calls": len(calls),
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "over_budget": sum(1 for ms in times if ms > budget_ms),
        "p50": statistics.median(times) if times else float("nan"),
        "p99": percentile(times, 0.99),
        "max": max(times, default=float("nan")),
    }


# ---------------------------------------------------------------------------------------------------------------
# The SQLite write-lock probe (its own process: ``probe_write_lock``)


def probe_write_lock(db_path: str, ready, go, stop, out_path: str, every: float = 0.01, spin: float = 0.0002) -> None:
    """Every ``every`` seconds, take SQLite's write lock (BEGIN IMMEDIATE, busy timeout 0) and release it at once
    (an empty transaction), retrying every ``spin`` seconds while it is busy. Per try it records, in ms: how long
    the lock was seen taken (from the first busy answer to the last; it may have changed hands in between), the
    whole wait until it was ours, and the longest gap between two tries (this probe's own resolution: it shares
    the CPU with everything else). Written to ``out_path`` as JSON."""
    conn = sqlite3.connect(db_path, timeout=0, isolation_level=None)
    busy, waits, gaps = [], [], []
    ready.set()
    go.wait()
    while not stop.is_set():
        started = last_try = time.perf_counter()
        last_busy, gap = None, 0.0
        while True:
            now = time.perf_counter()
            gap, last_try = max(gap, now - last_try), now
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError:
                last_busy = time.perf_counter()
                time.sleep(spin)
        acquired = time.perf_counter()
        conn.execute("COMMIT")
        busy.append((last_busy - started) * 1000 if last_busy else 0.0)
        waits.append((acquired - started) * 1000)
        gaps.append(gap * 1000)
        time.sleep(every)
    conn.close()
    Path(out_path).write_text(json.dumps({"busy": busy, "wait": waits, "gap": gaps}))


def summarise_probe(probe: dict) -> dict:
    return {
        "tries": len(probe["busy"]),
        "busy_max": max(probe["busy"], default=float("nan")),
        "busy_p99": percentile(probe["busy"], 0.99),
        "wait_max": max(probe["wait"], default=float("nan")),
        "gap_max": max(probe["gap"], default=float("nan")),
    }


# ---------------------------------------------------------------------------------------------------------------
# Write transactions of the job workers, timed inside them (``python -m bench.ledger_depth_parts``)


_DML = ("INSERT", "UPDATE", "DELETE", "REPLACE", "WITH")


class WriteHolds:
    """How long each write transaction of this process lasted, labelled with the app function that ran it.

    SQLite: from the moment the write lock is ours (after ``BEGIN IMMEDIATE``, or after the first write statement
    of a deferred transaction) to the end of COMMIT/ROLLBACK (or the connection's return to the pool, just after
    the driver's commit): the write-lock hold. PostgreSQL: from the transaction's first statement to its end
    (no global lock there; this is the transaction's cost, e.g. a claim's). Transactions that neither write nor
    lock rows (SELECT ... FOR UPDATE) are left out.
    """

    def __init__(self, dialect: str):
        self.sqlite = dialect == "sqlite"
        self.open: dict[int, dict] = {}
        self.holds: list[tuple[float, float, str]] = []  # (wall-clock start, ms, label)

    def install(self) -> None:
        sa.event.listen(sa.engine.Engine, "before_cursor_execute", self._before)
        sa.event.listen(sa.engine.Engine, "after_cursor_execute", self._after)
        sa.event.listen(sa.pool.Pool, "checkin", lambda dbapi_conn, _record: self._close(id(dbapi_conn)))

    def _before(self, conn, _cursor, statement, *_args) -> None:
        key = id(conn.connection.dbapi_connection)
        if key not in self.open and not statement.lstrip().upper().startswith(("PRAGMA", "COMMIT", "ROLLBACK")):
            self.open[key] = {"first": time.perf_counter(), "wall": time.time(), "write": None, "label": _caller()}

    def _after(self, conn, _cursor, statement, *_args) -> None:
        key = id(conn.connection.dbapi_connection)
        verb = statement.lstrip().upper()
        tx = self.open.get(key)
        if verb.startswith(("COMMIT", "ROLLBACK")):
            self._close(key)
        elif tx is not None and tx["write"] is None and _writes(verb):
            tx["write"] = time.perf_counter()
            if verb.startswith("BEGIN IMMEDIATE"):
                tx["wall"] = time.time()

    def _close(self, key: int) -> None:
        tx = self.open.pop(key, None)
        if tx is None or tx["write"] is None:
            return
        start = tx["write"] if self.sqlite else tx["first"]
        self.holds.append((tx["wall"], (time.perf_counter() - start) * 1000, tx["label"]))


def _writes(statement: str) -> bool:
    """Whether a statement (upper case) takes a write lock: SQLite's, or PostgreSQL row locks."""
    return statement.startswith(("BEGIN IMMEDIATE", *_DML)) or "FOR UPDATE" in statement


def _caller() -> str:
    """The innermost public function of the app (``ledger.claim``, ``ledger.sweep`` ...) on this thread's stack."""
    frame = sys._getframe(2)
    while frame is not None:
        module, name = frame.f_globals.get("__name__", ""), frame.f_code.co_name
        if module.startswith("app.") and module != "app.db" and not name.startswith(("_", "<")):
            return f"{module.rsplit('.', 1)[-1]}.{name}"
        frame = frame.f_back
    return "other"


def summarise_holds(holds: list, since: float, until: float) -> dict:
    """Per label, the holds that began in [since, until): count, p50, p99, max (ms)."""
    by_label: dict[str, list[float]] = {}
    for wall, ms, label in holds:
        if since <= wall < until:
            by_label.setdefault(label, []).append(ms)
    return {
        label: {"n": len(ms), "p50": statistics.median(ms), "p99": percentile(ms, 0.99), "max": max(ms)}
        for label, ms in sorted(by_label.items(), key=lambda item: -max(item[1]))
    }


def instrumented_worker(out_path: str, flask_args: list[str]) -> None:
    """``flask <flask_args>`` in this process, its write transactions timed; written to ``out_path`` at exit."""
    import atexit

    from flask.cli import main

    holds = WriteHolds("sqlite" if os.environ["DATABASE_URL"].startswith("sqlite") else "postgresql")
    holds.install()
    atexit.register(lambda: Path(out_path).write_text(json.dumps(holds.holds)))
    sys.argv = ["flask", *flask_args]
    main()


if __name__ == "__main__":
    instrumented_worker(sys.argv[1], sys.argv[2:])
