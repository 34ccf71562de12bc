"""Population batch (issue 13): a real run over FHIR Bulk Data against a bare scoring loop, per population size.

Per size, a deterministic synthetic population (``tests.support.population.write_population``, seed 1) as NDJSON:
- **bare loop** (the baseline, in a process of its own): read the same NDJSON files with orjson, group the
  resources by patient in memory (the ideal, memory aside), and call the service's own ``score_patient`` per
  patient inside an app context and ``app.ai.batch_lane()``, so that every patient goes through ``app.ai.infer``
  as in the batch;
- **batch**: a real run with ``gateway jobs worker`` processes (``--workers``, one claim loop each by default) on a
  fresh SQLite database: the Node FHIR test server exports the same files (``bulk_source``, the server's default
  settings: files need a token, ``Retry-After: 1``), and the workers get their Backend Services token from a
  token endpoint double on loopback (any well-formed ``client_credentials`` request gets a token; the assertion
  is signed with real keys but not verified). The run is timed from ``tasks.start`` to its end; the stages from
  the run's own stamps (``run_summary`` durations: export, split, score).

Reported: patients/s end to end and for the score stage; the per-patient cost of split + score with one worker
against the bare loop, by wall time (target: within 2x) and by CPU time (the workers' CPU sampled as the run's
state changes); the speed-up from one worker to two; the worker processes' peak RSS (VmHWM from /proc, read just
before they are stopped) and CPU seconds, at each size (target: peak RSS flat within 30 % from the smallest size to
the largest). The machine may be shared: before each measurement the bench waits (``--quiet-wait``, bounded) until
other people's processes use under 0.3 cores, and each row says how many cores they used while it was measured.
``--profile`` also profiles the score stage in-process (cProfile, the real ``batch.score`` handler on claimed
jobs) at the smallest size: the top 15 functions by cumulative time.

    .venv/bin/python -m bench.batch [--sizes 10000,100000] [--workers 1,2] [--threads 1] [--profile]

Needs Node >= 20 and ``npm ci --prefix tests/fhir_server``. Everything is written under one temporary directory,
removed at the end. On two idle cores 10,000 patients take about a minute, 100,000 about six.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import cProfile
import io
import itertools
import json
import multiprocessing
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import UTC, date, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import orjson
from flask import Flask

from app import create_app
from app.ai import batch_lane
from app.batch import runs, tasks
from app.batch.parts import patient_of
from app.batch.scoring import PatientResources, Scored
from app.fhir.compartment import Compartment
from app.jobs import ledger, presence
from app.jobs.registry import JobContext, job_kind
from app.jobs.worker import Worker
from app.smart.keys import KeyStore
from tests.support.databases import sqlite_database
from tests.support.fhir_server import FhirTestServer, fhir_server_available
from tests.support.population import RESOURCE_TYPES, write_population
from tests.support.processes import descendants, start_worker
from tests.support.tokens import TEST_ISSUER, SigningKey, clients_document

SERVICE = "cardiovascular-risk"
SEED = 1
COST_TARGET = 2.0  # split + score per patient, one worker, against the bare loop
RSS_TARGET = 1.30  # peak worker RSS at the largest size against the smallest
PROGRESS_EVERY_S = 15.0
QUIET_CORES = 0.3  # other processes' load under which a measurement may start
QUIET_SAMPLE_S = 2.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PF_KTHREAD = 0x00200000  # /proc/PID/stat flags: a kernel thread


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- /proc facts about a process --------------------------------------------------------------------------------


def peak_rss_mib(pid: int | str = "self") -> float:
    """The process's peak resident set size (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def user_processes_cpu() -> dict[int, float]:
    """CPU seconds of every process but kernel threads (whose work, writeback included, may be ours)."""
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            if not int(fields[6]) & PF_KTHREAD:
                found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return found


def ours() -> set[int]:
    """This process and every process below it (the workers, the bare loop's, the FHIR server)."""
    return {os.getpid(), *descendants(os.getpid())}


class OthersLoad:
    """The CPU that other people's processes used over a window, in cores (the machine may be shared): every
    user process's CPU but ours, those that started in the window counted whole, those that ended not at all."""

    def __init__(self):
        self._before, self._wall = user_processes_cpu(), time.monotonic()

    def cores(self) -> float:
        after, mine, wall = user_processes_cpu(), ours(), time.monotonic()
        used = sum(cpu - self._before.get(pid, 0.0) for pid, cpu in after.items() if pid not in mine)
        return max(0.0, used) / max(wall - self._wall, 1e-6)


def wait_for_quiet(limit: float) -> float:
    """Wait (at most ``limit`` seconds) until other processes use less than QUIET_CORES; their last load."""
    deadline = time.monotonic() + limit
    told = 0.0
    while True:
        window = OthersLoad()
        time.sleep(QUIET_SAMPLE_S)  # a sampling window, not a clock
        cores = window.cores()
        if cores < QUIET_CORES or time.monotonic() >= deadline:
            return cores
        if time.monotonic() - told > 30:
            log(f"waiting for a quiet machine: other processes use {cores:.1f} cores")
            told = time.monotonic()


# ---- the baseline ---------------------------------------------------------------------------------------------

# The generated files use relative references only: the compartment rule needs no server to read them.
ANY_SERVER = Compartment(None, None)


def bare_loop(settings: dict[str, str], directory: str, today: date) -> dict[str, float]:
    """Parse every NDJSON file, group by patient in memory, score each patient; runs in a process of its own."""
    from cds_services.cardiovascular_risk import score_patient

    app = create_app(settings)
    wall, cpu = time.perf_counter(), time.process_time()
    patients: dict[str | None, list[dict]] = defaultdict(list)
    for resource_type in RESOURCE_TYPES:
        with open(Path(directory) / f"{resource_type}.ndjson", "rb") as handle:
            for line in handle:
                resource = orjson.loads(line)
                patients[patient_of(resource, ANY_SERVER)].append(resource)
    parsed = time.perf_counter()
    scored = 0
    with app.app_context(), batch_lane():
        for patient_id, resources in patients.items():
            scored += isinstance(score_patient(PatientResources(patient_id, resources, today)), Scored)
    done = time.perf_counter()
    return {
        "patients": len(patients),
        "scored": scored,
        "seconds": done - wall,
        "parse_seconds": parsed - wall,
        "score_seconds": done - parsed,
        "cpu_seconds": time.process_time() - cpu,
        "peak_rss_mib": peak_rss_mib(),
    }


def run_bare_loop(settings: dict[str, str], directory: Path, today: date, quiet_wait: float) -> dict[str, float]:
    """The bare loop in a fresh process (its peak RSS its own), with the load others put on the machine."""
    wait_for_quiet(quiet_wait)
    others = OthersLoad()
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        result = pool.submit(bare_loop, settings, str(directory), today).result(timeout=3600)
    return {**result, "others_cores": others.cores()}


# ---- the batch ------------------------------------------------------------------------------------------------


class TokenEndpoint:
    """A SMART Backend Services token endpoint double on loopback: a token for any ``client_credentials``
    request that carries a client assertion (not verified: the bench measures the batch, not the EHR)."""

    def __init__(self):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _TokenHandler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/token"

    def __enter__(self) -> TokenEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _TokenHandler(BaseHTTPRequestHandler):
    serials = itertools.count(1)

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
        if form.get("grant_type") != ["client_credentials"] or not form.get("client_assertion"):
            self._answer(400, {"error": "invalid_request"})
            return
        scope = form.get("scope", [""])[0]
        token = f"bench-token-{next(_TokenHandler.serials)}"
        self._answer(200, {"access_token": token, "token_type": "Bearer", "expires_in": 3600, "scope": scope})

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def shared_settings(work: Path, token_url: str) -> dict[str, str]:
    """The clients file (our test EHR, allowed the loopback FHIR server, with Backend Services) and the keys."""
    document = clients_document(SigningKey.generate(), ["http://127.0.0.1:*"])
    document["clients"][0]["smart_backend"] = {
        "token_url": token_url,
        "client_id": "bench-batch",
        "scope": "system/Patient.rs system/Observation.rs system/Condition.rs system/MedicationRequest.rs",
    }
    clients = work / "clients.json"
    clients.write_text(json.dumps(document))
    keys = work / "keys"
    KeyStore(keys).generate()
    return {"CDS_CLIENTS_FILE": str(clients), "KEYS_DIR": str(keys), "LOG_LEVEL": "WARNING"}


def run_settings(base: dict[str, str], root: Path, database_url: str) -> dict[str, str]:
    return {
        **base,
        "DATABASE_URL": database_url,
        "INSTANCE_PATH": str(root / "instance"),
        "AUDIT_LOG": str(root / "audit.jsonl"),
        "BATCH_DIR": str(root / "batch"),
    }


def fresh_run(base: dict[str, str], root: Path) -> tuple[dict[str, str], Flask]:
    """A new root with a migrated SQLite database; its settings and an application on them (this process)."""
    root.mkdir(parents=True)
    settings = run_settings(base, root, sqlite_database(root))
    return settings, create_app(settings)


def wait_live(engine, workers: list[subprocess.Popen], want: int, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while presence.live_count(engine) < want:
        if any(w.poll() is not None for w in workers):
            raise RuntimeError("a job worker exited while starting")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{want} job workers not live after {limit:.0f} s")
        time.sleep(0.1)


def parts_done(app, run_id: str) -> int:
    return sum(1 for _ in (tasks.run_dir(app, run_id) / "parts").glob("b*/summary.json"))


def wait_ended(
    app, run_id: str, workers: list[subprocess.Popen], label: str, limit: float
) -> tuple[runs.Run, dict[str, float]]:
    """Poll the run until it ends (bounded), with a progress line now and then; the run, and the workers' CPU
    seconds when each state was first seen (``ended`` last): each stage's CPU, to a poll (0.1 s) of its edges."""
    engine = app.extensions["db"]
    started = time.monotonic()
    next_progress = started + PROGRESS_EVERY_S
    seen: dict[str, float] = {}
    while True:
        run = runs.get(engine, run_id)
        if run.state not in seen:
            seen[run.state] = sum(cpu_seconds(w.pid) for w in workers)
        if run.ended:
            seen["ended"] = seen[run.state]
            return run, seen
        if any(w.poll() is not None for w in workers):
            raise RuntimeError(f"{label}: a job worker exited during the run")
        now = time.monotonic()
        if now > started + limit:
            raise RuntimeError(f"{label}: the run did not end within {limit:.0f} s (state {run.state})")
        if now >= next_progress:
            buckets = (run.plan or {}).get("buckets", "?")
            done = parts_done(app, run_id) if run.plan else 0
            log(f"{label}: {now - started:.0f} s, {run.state}, buckets scored {done}/{buckets}")
            next_progress = now + PROGRESS_EVERY_S
        time.sleep(0.1)


def stop(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)


def run_batch(
    base: dict[str, str], root: Path, server: FhirTestServer, n: int, processes: int, threads: int, quiet_wait: float
) -> dict:
    """One real run through ``processes`` worker processes; its figures."""
    label = f"{n:,} patients, {processes} worker(s)"
    settings, app = fresh_run(base, root)
    engine = app.extensions["db"]
    workers = [
        start_worker(settings, "--threads", str(threads), log_path=root / f"worker-{i}.log") for i in range(processes)
    ]

    try:
        wait_live(engine, workers, processes)
        os.sync()  # earlier steps' dirty pages written out now, not during this run's fsyncs
        wait_for_quiet(quiet_wait)
        log(f"{label}: workers live, starting the run")
        booted = sum(cpu_seconds(w.pid) for w in workers)
        others = OthersLoad()
        started = time.perf_counter()
        with app.app_context():
            run = tasks.start(app, service_id=SERVICE, client_iss=TEST_ISSUER, fhir_server=server.base_url)
        run, cpu_seen = wait_ended(app, run.id, workers, label, limit=max(600.0, n * 0.05))
        elapsed = time.perf_counter() - started
        others_cores = others.cores()
        peaks = [peak_rss_mib(w.pid) for w in workers]  # before they exit: their /proc entries go with them
        cpu = sum(cpu_seconds(w.pid) for w in workers) - booted
    finally:
        stop(workers)
    if run.state != runs.SUCCEEDED:
        tail = "".join((root / f"worker-{i}.log").read_text()[-2000:] for i in range(processes))
        raise RuntimeError(f"{label}: run {run.state}: {run.error}\n{tail}")
    summary = run.summary
    durations = summary["durations"]
    result = {
        "size": n,
        "workers": processes,
        "elapsed": elapsed,
        "stamped_total": durations["total"],
        "export": durations["export"],
        "export_server": _seconds(run.times, "created", "exportCompleted"),
        "download": _seconds(run.times, "exportCompleted", "exported"),
        "split": durations["split"],
        "score": durations["score"],
        "finish": _seconds(run.times, "scored", "finished"),
        "patients": summary["counts"]["patients"],
        "scored": summary["counts"]["scored"],
        "buckets": summary["parts"]["total"],
        "ranges": len((run.plan or {}).get("ranges", ())),
        "export_bytes": sum(f["bytes"] for f in (run.plan or {}).get("files", ())),
        "peak_rss_mib": max(peaks),
        "peaks": peaks,
        "cpu_seconds": cpu,
        "split_score_cpu": _stage_cpu(cpu_seen, runs.SPLITTING, (runs.FINISHING, "ended")),
        "others_cores": others_cores,
    }
    app.extensions["db"].dispose()
    shutil.rmtree(root, ignore_errors=True)  # outputs and database: the next run starts on an empty disk
    return result


def _stage_cpu(seen: dict[str, float], first: str, last: tuple[str, ...]) -> float | None:
    """Workers' CPU seconds from the state ``first`` to the first of ``last`` that was seen."""
    end = next((seen[state] for state in last if state in seen), None)
    return None if first not in seen or end is None else end - seen[first]


def _seconds(times: dict[str, str], first: str, last: str) -> float | None:
    try:
        return (datetime.fromisoformat(times[last]) - datetime.fromisoformat(times[first])).total_seconds()
    except (KeyError, ValueError):
        return None


def profile_score_stage(base: dict[str, str], root: Path, server: FhirTestServer, top: int = 15) -> str:
    """Export and split in this process, then the real ``batch.score`` handler on each claimed score job under
    cProfile (in this thread: the worker runs handlers on threads of their own, which cProfile does not see)."""
    settings, app = fresh_run(base, root)
    engine = app.extensions["db"]
    with app.app_context():
        run = tasks.start(app, service_id=SERVICE, client_iss=TEST_ISSUER, fhir_server=server.base_url)
    worker = Worker(app, kinds=[tasks.EXPORT, tasks.SPLIT])
    deadline = time.monotonic() + 600
    while runs.get(engine, run.id).state in (runs.EXPORTING, runs.SPLITTING):
        if time.monotonic() > deadline:
            raise RuntimeError("profile: the export and split did not end within 600 s")
        if not worker.run_until_idle():
            time.sleep(0.05)  # the export's polls are due at the server's Retry-After, in real time
    handler = job_kind(tasks.SCORE).handler
    profiler = cProfile.Profile()
    jobs = 0
    wall = time.perf_counter()
    while job := ledger.claim(engine, "bench-profile", lease_seconds=3600, kinds=[tasks.SCORE], sweep_first=False):
        with app.app_context():
            profiler.enable()
            try:
                result = handler(JobContext(app, job))
            finally:
                profiler.disable()
        ledger.complete(engine, job, result)
        jobs += 1
    wall = time.perf_counter() - wall
    Worker(app).run_until_idle()  # the finish, so that the run ends as any other
    state = runs.get(engine, run.id).state
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(top)
    engine.dispose()
    shutil.rmtree(root, ignore_errors=True)
    head = f"score stage under cProfile: {jobs} buckets in {wall:.1f} s (profiler overhead included); run {state}"
    return head + "\n" + _trim_stats(out.getvalue())


def _trim_stats(text: str) -> str:
    """pstats' table without its preamble of blank and file lines."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "function calls" in line), 0)
    return "\n".join(line.replace(str(Path.cwd()) + "/", "") for line in lines[start:] if line.strip())


# ---- the report -------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def wall_ratio(run: dict, bare: dict) -> float:
    """Split + score stage time of a run against the bare loop's time (same patients: per-patient cost)."""
    return (run["split"] + run["score"]) / bare["seconds"]


def noisy(cores: float) -> str:
    return f"{cores:.2f}" + (" (noisy)" if cores >= QUIET_CORES else "")


def print_report(sizes: list[int], counts: list[int], populations: dict, bare: dict, batches: dict) -> None:
    print()
    print("| patients | resources | NDJSON MB | exported MB | ranges | buckets |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in sizes:
        some = next(r for (size, _), r in batches.items() if size == n)
        p = populations[n]
        print(
            f"| {n:,} | {p['resources']:,} | {p['bytes'] / 1e6:,.1f} | {some['export_bytes'] / 1e6:,.1f} "
            f"| {some['ranges']} | {some['buckets']} |"
        )
    print()
    print(
        "| patients | runner | total s | patients/s | export s (server + download) | split s | score s | finish s "
        "| score patients/s | (split+score) / bare, wall | split+score CPU s | (split+score) / bare, CPU "
        "| peak RSS MiB | run CPU s | others' cores |"
    )
    print("|" + " --- |" * 15)
    for n in sizes:
        b = bare[n]
        print(
            f"| {n:,} | bare loop (parse {b['parse_seconds']:.1f} s + score {b['score_seconds']:.1f} s) "
            f"| {b['seconds']:.1f} | {n / b['seconds']:,.0f} | - | - | - | - | {n / b['score_seconds']:,.0f} | 1.00 "
            f"| {b['cpu_seconds']:.1f} | 1.00 | {b['peak_rss_mib']:,.0f} | {b['cpu_seconds']:.1f} "
            f"| {noisy(b['others_cores'])} |"
        )
        for w in counts:
            r = batches[(n, w)]
            peaks = " / ".join(f"{p:,.0f}" for p in r["peaks"])
            export = f"{fmt(r['export'])} ({fmt(r['export_server'])} + {fmt(r['download'])})"
            cpu = r["split_score_cpu"]
            print(
                f"| {n:,} | {w} worker(s) | {r['elapsed']:.1f} | {n / r['elapsed']:,.0f} | {export} "
                f"| {fmt(r['split'])} | {fmt(r['score'])} | {fmt(r['finish'])} | {n / r['score']:,.0f} "
                f"| {wall_ratio(r, b):.2f} | {fmt(cpu)} | {fmt(cpu and cpu / b['cpu_seconds'], 2)} | {peaks} "
                f"| {r['cpu_seconds']:.1f} | {noisy(r['others_cores'])} |"
            )
    print()
    for n in sizes:
        b = bare[n]
        for w in counts:
            r = batches[(n, w)]
            if (r["patients"], r["scored"]) != (b["patients"], b["scored"]):
                print(
                    f"MISMATCH at {n:,} patients, {w} worker(s): batch {r['patients']} patients {r['scored']} scored, "
                    f"bare loop {b['patients']} patients {b['scored']} scored"
                )
    print(f"Targets (a figure marked noisy was measured while other processes used {QUIET_CORES} cores or more):")
    one = min(counts)
    for n in sizes:
        r, b = batches[(n, one)], bare[n]
        ratio = wall_ratio(r, b)
        verdict = "met" if ratio <= COST_TARGET else "MISSED"
        cpu = r["split_score_cpu"]
        print(
            f"- per-patient cost, split + score with {one} worker(s) / bare loop, {n:,} patients: {ratio:.2f}x wall "
            f"(target <= {COST_TARGET:.1f}x: {verdict}); {fmt(cpu and cpu / b['cpu_seconds'], 2)}x CPU"
        )
    if len(counts) > 1:
        many = max(counts)
        for n in sizes:
            low, high = batches[(n, one)], batches[(n, many)]
            print(
                f"- speed-up {one} -> {many} workers, {n:,} patients: end to end "
                f"{low['elapsed'] / high['elapsed']:.2f}x, score stage {low['score'] / high['score']:.2f}x, "
                f"split stage {low['split'] / high['split']:.2f}x (no target; {os.cpu_count()} cores)"
            )
    if len(sizes) > 1:
        small, large = min(sizes), max(sizes)
        for w in counts:
            a, z = batches[(small, w)]["peak_rss_mib"], batches[(large, w)]["peak_rss_mib"]
            verdict = "met" if z / a <= RSS_TARGET else "MISSED"
            print(
                f"- worker peak RSS, {w} worker(s): {a:,.0f} MiB at {small:,} -> {z:,.0f} MiB at {large:,} "
                f"= {z / a:.2f}x (target <= {RSS_TARGET:.2f}x: {verdict})"
            )
        a, z = bare[small]["peak_rss_mib"], bare[large]["peak_rss_mib"]
        print(f"- bare loop peak RSS (all in memory, for reference): {a:,.0f} MiB -> {z:,.0f} MiB = {z / a:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="population sizes, comma-separated")
    parser.add_argument("--workers", default="1,2", help="worker process counts, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="claim loops per worker process (--threads)")
    parser.add_argument("--profile", action="store_true", help="also profile the score stage at the first size")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=300,
        help="seconds to wait, before each measurement, for other processes to use under 0.3 cores (0: no wait)",
    )
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    counts = sorted(int(w) for w in args.workers.split(","))
    reason = fhir_server_available()
    if reason:
        print(f"bench.batch needs the FHIR test server: {reason}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    populations, bare, batches, profile = {}, {}, {}, None
    try:
        (work / "node").mkdir()
        with (
            FhirTestServer(extra_env={"TMPDIR": str(work / "node")}, request_timeout=120) as server,
            TokenEndpoint() as token,
        ):
            base = shared_settings(work, token.url)
            print(
                f"bench.batch: {SERVICE}, seed {SEED}, SQLite, {args.threads} claim loop(s) per worker process, "
                f"{os.cpu_count()} cores; token endpoint double on loopback (Backend Services, files need the token)"
            )
            for n in sizes:
                directory = work / f"population-{n}"
                log(f"{n:,} patients: writing the population")
                written = write_population(directory, n, seed=SEED)
                populations[n] = {
                    "resources": sum(v for k, v in written.items() if k in RESOURCE_TYPES),
                    "bytes": sum((directory / f"{t}.ndjson").stat().st_size for t in RESOURCE_TYPES),
                }
                log(f"{n:,} patients: bare loop")
                os.sync()
                today = datetime.now(UTC).date()  # the run scores as of its export's transactionTime: today
                bare_settings = run_settings(base, work / "bare", f"sqlite:///{work / 'bare.db'}")
                bare[n] = run_bare_loop(bare_settings, directory, today, args.quiet_wait)
                log(f"{n:,} patients: bare loop {bare[n]['seconds']:.1f} s")
                server.bulk_reset()
                server.bulk_source(directory)
                for w in counts:
                    batches[(n, w)] = run_batch(
                        base, work / f"run-{n}-{w}", server, n, w, args.threads, args.quiet_wait
                    )
                    log(f"{n:,} patients, {w} worker(s): {batches[(n, w)]['elapsed']:.1f} s")
                if args.profile and n == sizes[0]:
                    log(f"{n:,} patients: profiling the score stage")
                    profile = profile_score_stage(base, work / f"profile-{n}", server)
                server.bulk_reset()
                shutil.rmtree(directory, ignore_errors=True)
                shutil.rmtree(work / "bare", ignore_errors=True)
        print_report(sizes, counts, populations, bare, batches)
        if profile:
            print()
            print(profile)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
