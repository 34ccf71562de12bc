"""Failure isolation at depth (issue 10): hook latency, drain rate and /metrics time over a deep job backlog.

Per database and backlog: a fresh database holding ``backlog`` no-op canary jobs (queued, due now, inserted in
bulk), the gateway under gunicorn, and two ``flask --app app jobs worker --kind jobs.canary`` processes (two claim
loops each, the command's default) draining them. After the workers' first jobs and a warm-up, for ``--seconds``:
- discharge-summary hooks over HTTP (each for a new encounter, so each enqueues a job, which the canary-only
  workers leave alone), from ``--clients`` clients at ``--rate`` calls/s each; latency from sending to the whole
  answer, signing the JWT excluded; a slow call delays that client's next one (no catching up in a burst);
- patient-view hooks (fixtures/hooks/patient-view-cardiovascular-risk.json), the control: no ledger write;
- the drain rate: canary jobs succeeded per second over the window, from the ledger;
- /metrics scrapes every ``--scrape-every`` seconds (median and max wall time);
- the workers' write transactions, timed inside the worker processes (SQLite: how long each held the write lock;
  PostgreSQL: how long each took), per ledger function; see ``ledger_depth_parts.WriteHolds``;
- on SQLite, how long the write lock stayed taken as a probe process sees it, taking and releasing the lock every
  10 ms with a 0.2 ms busy wait (``ledger_depth_parts.probe_write_lock``).
The backlog is topped up as it drains (one small batch every 0.5 s), so its depth holds through the window.
After the bulk load, pending count changes are folded when the ledger keeps counts that way (``fold_counts``),
and PostgreSQL's tables are VACUUM ANALYZEd, as autovacuum would have (it is off on the test server).

    .venv/bin/python -m bench.ledger_depth          # SQLite 1,000 and 100,000; PostgreSQL 1,000, 100,000, 1,000,000
    .venv/bin/python -m bench.ledger_depth --databases sqlite --backlogs 1000,100000 --seconds 20
    .venv/bin/python -m bench.ledger_depth --sqlite-max --json rows.jsonl   # SQLite 1,000,000 too; rows as JSON
    .venv/bin/python -m bench.ledger_depth --table-from rows.jsonl          # the tables again, from saved rows

A row takes about a minute plus the bulk load (1,000,000 rows: 10-30 s); a row whose workers have not finished
their first jobs within ``--warmup-limit`` seconds is measured anyway, and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import requests
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization

from app.db import make_engine
from app.jobs import ledger
from bench.ledger_depth_parts import (
    DISCHARGE,
    FHIR_SERVER,
    FIXTURE,
    PATIENT_VIEW,
    Backlog,
    TopUp,
    discharge_body,
    probe_write_lock,
    run_hook_load,
    scrape_metrics,
    start_gateway,
    start_worker,
    stop_process,
    summarise_calls,
    summarise_holds,
    summarise_probe,
)
from tests.support.databases import postgres_database, postgres_unavailable, sqlite_database
from tests.support.processes import free_port
from tests.support.tokens import SigningKey, clients_document

DEFAULT_BACKLOGS = {"sqlite": [1_000, 100_000], "postgresql": [1_000, 100_000, 1_000_000]}
HOOK_BUDGET_MS = float(os.environ.get("HOOK_BUDGET_MS", "500"))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def gateway_settings(url: str, work: Path, key: SigningKey) -> dict[str, str]:
    """Settings for gunicorn and the workers: a client trusted with a FHIR server and SMART Backend Services
    (both on closed local ports: the discharge hook only enqueues), the service on loopback."""
    document = clients_document(key, [FHIR_SERVER])
    document["clients"][0]["smart_backend"] = {
        "token_url": "http://127.0.0.1:9/token",
        "client_id": "bench",
        "scope": "system/DocumentReference.c system/Encounter.r",
    }
    clients = work / "clients.json"
    clients.write_text(json.dumps(document))
    return {
        "DATABASE_URL": url,
        "CDS_CLIENTS_FILE": str(clients),
        "INSTANCE_PATH": str(work / "instance"),
        "AUDIT_LOG": str(work / "audit.jsonl"),
        "LOG_LEVEL": "WARNING",
    }


def call_once(base: str, key: SigningKey, path: str, body: dict) -> None:
    """One call before measuring: the hook answers with its card, and each gunicorn worker's first call is made."""
    answer = requests.post(
        base + path, json=body, timeout=60, headers={"Authorization": f"Bearer {key.token(base + path)}"}
    )
    answer.raise_for_status()


def wait_for_workers(top_up: TopUp, workers: list, want: int, limit: float) -> float | None:
    """Seconds until ``want`` jobs have succeeded, or None when ``limit`` passed first."""
    started = time.monotonic()
    while not top_up.samples or top_up.samples[-1][1] < want:
        if any(w.poll() is not None for w in workers):
            raise RuntimeError("a job worker exited")
        if top_up.error:
            raise top_up.error
        if time.monotonic() - started > limit:
            return None
        time.sleep(0.2)
    return time.monotonic() - started


def spawn_measurers(args, base: str, key: SigningKey, sqlite_path: str | None, work: Path):
    """The hook clients and (SQLite) the lock probe, each its own process, started and waiting for ``go``."""
    spawn = multiprocessing.get_context("spawn")
    go, stop = spawn.Event(), spawn.Event()
    pem = key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    spec = {
        "base": base,
        "key_pem": pem.decode(),
        "kid": key.kid,
        "seconds": args.seconds,
        "rate": args.rate,
        "discharge_clients": args.clients,
        "control_clients": args.control_clients,
    }
    ready = [spawn.Event() for _ in range(2 if sqlite_path else 1)]
    children = [spawn.Process(target=run_hook_load, args=(spec, ready[0], go, str(work / "calls.json")))]
    if sqlite_path:
        lock_file = str(work / "lock.json")
        children.append(spawn.Process(target=probe_write_lock, args=(sqlite_path, ready[1], go, stop, lock_file)))
    for child in children:
        child.start()
    return children, ready, go, stop


def measure_window(args, base: str, key: SigningKey, top_up: TopUp, sqlite_path: str | None, work: Path) -> dict:
    """The measured window: hook clients and lock probe in their processes; /metrics scrapes and drain from here."""
    children, ready, go, stop = spawn_measurers(args, base, key, sqlite_path, work)
    try:
        if not all(event.wait(60) for event in ready):
            raise RuntimeError("a measuring process did not start")
        started, wall_started, load_before = time.monotonic(), time.time(), os.getloadavg()[0]
        ended = started + args.seconds
        go.set()
        scrapes, scrape_failures = [], Counter()
        for k in range(int(args.seconds / args.scrape_every)):
            time.sleep(max(0.0, started + (k + 0.5) * args.scrape_every - time.monotonic()))
            try:
                scrapes.append(scrape_metrics(base))
            except (requests.RequestException, RuntimeError) as exc:
                scrape_failures[type(exc).__name__] += 1
        children[0].join(timeout=args.seconds + 120)
        if children[0].exitcode != 0:
            raise RuntimeError(f"the hook clients failed (exit code {children[0].exitcode})")
    finally:
        stop.set()
        go.set()
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
    while top_up.samples[-1][0] < ended and top_up.is_alive():
        time.sleep(0.1)
    calls = json.loads((work / "calls.json").read_text())
    return {
        "window": (wall_started, wall_started + args.seconds),
        "load_average": (round(load_before, 2), round(os.getloadavg()[0], 2)),  # 1-minute, at start and end
        "discharge": summarise_calls(calls[DISCHARGE], HOOK_BUDGET_MS),
        "patient_view": summarise_calls(calls[PATIENT_VIEW], HOOK_BUDGET_MS),
        "drain": (top_up.finished_at(ended) - top_up.finished_at(started)) / args.seconds,
        "metrics": {"n": len(scrapes), "median": statistics.median(scrapes), "max": max(scrapes)} if scrapes else None,
        "metrics_failures": dict(scrape_failures),
        "lock": summarise_probe(json.loads((work / "lock.json").read_text())) if sqlite_path else None,
    }


def prefill(engine: sa.Engine, database: str, size: int) -> Backlog:
    """``size`` canary jobs; then what the ledger would have done by the time a real backlog got this deep: its
    pending count changes folded (when it keeps counts that way), and on PostgreSQL the tables analysed."""
    backlog = Backlog(engine)
    backlog.add(size - 1)
    fold = getattr(ledger, "fold_counts", None)
    while fold is not None and fold(engine):
        pass
    if database == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    return backlog


def serve(stack: contextlib.ExitStack, url: str, work: Path, key: SigningKey):
    """gunicorn on a free port, each hook called a few times; its base URL, settings for the workers, process."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**gateway_settings(url, work, key), "PUBLIC_BASE_URL": base}
    (work / "prometheus").mkdir()
    gateway = start_gateway({**env, "PROMETHEUS_MULTIPROC_DIR": str(work / "prometheus")}, port, work / "gw.log")
    stack.callback(stop_process, gateway)
    for _ in range(4):  # reach both gunicorn workers
        call_once(base, key, DISCHARGE, discharge_body())
        call_once(base, key, PATIENT_VIEW, json.loads(FIXTURE.read_text()))
    return base, env, gateway


def start_workers(stack: contextlib.ExitStack, env: dict[str, str], work: Path, args, holds: list[Path]) -> list:
    """The canary-only job workers, stopped (SIGTERM) when ``stack`` closes."""
    workers = []
    for i in range(args.workers):
        command = ("--kind", "jobs.canary", "--threads", str(args.worker_threads))
        holds_path = holds[i] if holds else None
        workers.append(start_worker(env, work / f"worker-{i}.log", *command, holds_path=holds_path))
        stack.callback(stop_process, workers[-1])
    return workers


def run_row(database: str, url: str, backlog_size: int, args, work: Path) -> dict:
    """One row of the table on a fresh, migrated database at ``url``."""
    row = {"database": database, "backlog": backlog_size, "workers": f"{args.workers}x{args.worker_threads}"}
    engine = make_engine(url)
    holds = [] if args.plain_workers else [work / f"holds-{i}.json" for i in range(args.workers)]
    with contextlib.ExitStack() as stack:
        stack.callback(engine.dispose)
        started = time.monotonic()
        backlog = prefill(engine, database, backlog_size)
        row["prefill_s"] = time.monotonic() - started
        log(f"{database} {backlog_size:,}: {backlog.added:,} jobs in {row['prefill_s']:.1f} s")
        key = SigningKey.generate()
        base, env, gateway = serve(stack, url, work, key)
        top_up = TopUp(backlog, enabled=not args.no_top_up)
        top_up.start()
        stack.callback(lambda: (top_up.stop.set(), top_up.join(timeout=60)))
        workers = start_workers(stack, env, work, args, holds)
        row["first_jobs_s"] = first = wait_for_workers(top_up, workers, 2 * args.workers, args.warmup_limit)
        if first is None:
            row["note"] = f"workers had not finished {2 * args.workers} jobs after {args.warmup_limit:g} s"
        log(f"  workers' first jobs after {first if first is None else round(first, 1)} s; measuring")
        time.sleep(args.warmup)
        sqlite_path = sa.make_url(url).database if database == "sqlite" else None
        row.update(measure_window(args, base, key, top_up, sqlite_path, work))
        row["topped_up"], row["top_up_lock_timeouts"] = top_up.topped_up, top_up.lock_timeouts
        exited = {
            name: p.poll() for name, p in [("gunicorn", gateway)] + [(f"worker-{i}", w) for i, w in enumerate(workers)]
        }
        if any(code is not None for code in exited.values()):
            row["note"] = f"exited during the row: {exited} (logs kept)"
            row["logs"] = keep_logs(work)
        if top_up.error:
            raise top_up.error
    row["holds"] = worker_holds(holds, *row.pop("window"))
    with engine.connect() as conn:
        discharge_jobs = ledger.jobs.c.kind == "discharge-summary.draft"
        row["discharge_jobs"] = conn.execute(sa.select(sa.func.count()).where(discharge_jobs)).scalar()
    engine.dispose()
    return row


def worker_holds(paths: list[Path], since: float, until: float) -> dict | None:
    """The workers' write transactions that began in the window, per app function (see ``WriteHolds``)."""
    if not paths:
        return None
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        log(f"  no write-transaction times from {', '.join(missing)} (the worker did not exit cleanly)")
    holds = [hold for p in paths if p.exists() for hold in json.loads(p.read_text())]
    return summarise_holds(holds, since, until)


def each_database(names: list[str]):
    """(name, url, work directory) per row's database: a fresh SQLite file, or a PostgreSQL database dropped after."""
    for name in names:
        if name == "sqlite":
            yield name, lambda work: contextlib.nullcontext(sqlite_database(work))
        elif reason := postgres_unavailable():
            log(f"PostgreSQL skipped: {reason}")
        else:
            yield name, lambda work: postgres_database()


def fmt(value, digits: int = 0) -> str:
    return "-" if value is None or value != value else f"{value:,.{digits}f}"


def print_table(rows: list[dict]) -> None:
    print(
        "| database | backlog | workers | discharge p50 / p99 (max) ms | patient-view p50 / p99 ms | drain jobs/s "
        "| /metrics ms median / max | worker write tx, longest ms | SQLite lock seen busy, max ms "
        f"| hook calls / failed / over {HOOK_BUDGET_MS:.0f} ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        if "error" in row:
            print(f"| {row['database']} | {row['backlog']:,} | {row['workers']} | error: {row['error']} |")
            continue
        d, p, m = row["discharge"], row["patient_view"], row["metrics"] or {}
        longest = max((row["holds"] or {}).items(), key=lambda item: item[1]["max"], default=None)
        held = f"{longest[1]['max']:,.1f} ({longest[0]})" if longest else "-"
        cells = [
            row["database"],
            f"{row['backlog']:,}",
            row["workers"],
            f"{fmt(d['p50'], 1)} / {fmt(d['p99'], 1)} ({fmt(d['max'])})",
            f"{fmt(p['p50'], 1)} / {fmt(p['p99'], 1)}",
            fmt(row["drain"], 1),
            f"{fmt(m.get('median'), 1)} / {fmt(m.get('max'), 1)}",
            held,
            fmt((row["lock"] or {}).get("busy_max"), 1),
            f"{d['calls'] + p['calls']} / {d['failed'] + p['failed']} / {d['over_budget'] + p['over_budget']}",
        ]
        print("| " + " | ".join(cells) + " |")


def print_details(rows: list[dict]) -> None:
    """Row by row: failed hook calls, the workers' write transactions per app function, the lock probe's view."""
    for row in rows:
        if "error" in row:
            continue
        name = f"{row['database']} {row['backlog']:,}"
        if row.get("note"):
            print(f"{name}: {row['note']}")
        for hook in ("discharge", "patient_view"):
            if row[hook].get("failures"):
                print(f"{name}, {hook} calls that failed: {row[hook]['failures']}")
        if row.get("metrics_failures"):
            print(f"{name}, /metrics scrapes that failed: {row['metrics_failures']}")
        if not row.get("holds"):
            continue
        parts = [
            f"{label} {h['n']}: {h['p50']:.2f} / {h['p99']:.1f} / {h['max']:.1f}" for label, h in row["holds"].items()
        ]
        print(f"{row['database']} {row['backlog']:,}, worker write tx ms (n: p50 / p99 / max): {'; '.join(parts)}")
        if row["lock"]:
            lock = row["lock"]
            print(
                f"  lock probe: {lock['tries']} tries, seen busy p99 {lock['busy_p99']:.1f} / max "
                f"{lock['busy_max']:.1f} ms, wait max {lock['wait_max']:.1f} ms, "
                f"probe's own longest gap {lock['gap_max']:.1f} ms"
            )


def print_ratios(rows: list[dict]) -> None:
    """The issue's targets: deepest vs 1,000 for the enqueueing hook's p99 and the drain rate; /metrics at depth."""
    for database in dict.fromkeys(row["database"] for row in rows):
        done = {row["backlog"]: row for row in rows if row["database"] == database and "error" not in row}
        if 1_000 not in done or len(done) < 2:
            continue
        deepest = max(done)
        low, deep = done[1_000], done[deepest]
        p99 = deep["discharge"]["p99"] / low["discharge"]["p99"]
        drain = deep["drain"] / low["drain"] if low["drain"] else float("nan")
        print(
            f"{database}: discharge p99 at {deepest:,} / at 1,000 = {p99:.2f} (target <= 2; "
            f"and {deep['discharge']['p99']:.0f} ms, target < 100); "
            f"drain at {deepest:,} / at 1,000 = {drain:.2f} (target >= 0.8); "
            f"/metrics max at {deepest:,} = {fmt((deep['metrics'] or {}).get('max'), 1)} ms (target < 100 at 1,000,000)"
        )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--backlogs", help="comma-separated depths for every database (default: per database)")
    parser.add_argument("--sqlite-max", action="store_true", help="SQLite at 1,000,000 too (default backlogs)")
    parser.add_argument("--seconds", type=float, default=30, help="measured window per row")
    parser.add_argument(
        "--warmup", type=float, default=5, help="seconds between the workers' first jobs and the window"
    )
    parser.add_argument(
        "--warmup-limit", type=float, default=180, help="longest wait for the workers' first jobs (then measure anyway)"
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--worker-threads", type=int, default=2, help="claim loops per worker process (its default)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent discharge-hook clients")
    parser.add_argument("--control-clients", type=int, default=1, help="concurrent patient-view clients")
    parser.add_argument("--rate", type=float, default=5, help="calls/s per client (0: back to back)")
    parser.add_argument("--scrape-every", type=float, default=3, help="seconds between /metrics scrapes")
    parser.add_argument("--no-top-up", action="store_true", help="let the backlog drain instead of holding its depth")
    parser.add_argument(
        "--plain-workers", action="store_true", help="run the flask command itself (no write-transaction timing)"
    )
    parser.add_argument("--json", type=Path, help="append each row to this file as a JSON line")
    parser.add_argument("--table-from", type=Path, help="print the tables from rows saved by --json; run nothing")
    return parser.parse_args(argv)


def backlogs_for(database: str, args) -> list[int]:
    if args.backlogs:
        return [int(b.replace("_", "")) for b in args.backlogs.split(",")]
    extra = [1_000_000] if database == "sqlite" and args.sqlite_max else []
    return DEFAULT_BACKLOGS[database] + extra


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table_from:
        print_all([json.loads(line) for line in args.table_from.read_text().splitlines() if line.strip()])
        return 0
    rows = []
    for database, make_database in each_database([d.strip() for d in args.databases.split(",")]):
        for backlog_size in backlogs_for(database, args):
            with tempfile.TemporaryDirectory(prefix="bench-depth-") as tmp:
                work = Path(tmp)
                try:
                    with make_database(work) as url:
                        row = run_row(database, url, backlog_size, args, work)
                except Exception as exc:  # one failed row is reported, the others still run
                    traceback.print_exc()
                    row = {"database": database, "backlog": backlog_size, "workers": "-", "error": repr(exc)[:200]}
                    row["logs"] = keep_logs(work)
            rows.append(row)
            log(json.dumps(row))
            if args.json:
                with args.json.open("a") as out:
                    out.write(json.dumps(row) + "\n")
    print_all(rows)
    return 0


def keep_logs(work: Path) -> str:
    """Copy a row's process logs (gunicorn, workers) out of its temporary directory; returns where."""
    kept = Path(tempfile.mkdtemp(prefix="bench-depth-logs-"))
    for log_file in work.glob("*.log"):
        shutil.copy(log_file, kept)
    return str(kept)


def print_all(rows: list[dict]) -> None:
    print_table(rows)
    print()
    print_ratios(rows)
    print()
    print_details(rows)


if __name__ == "__main__":
    raise SystemExit(main())
