"""The guard under load: hook throughput and latency with a remote model, healthy, faulty, and breaker open.

One run, one table, against the bare-echo baseline measured in the same run. The remote model is the test
suite's fault-injecting v2 server (serving the real embedded model when healthy). With --breaker off the
breaker never opens, so each fault's own cost is measured; by default it opens as configured and most
calls take the open-breaker path.

    .venv/bin/python -m bench.ai_guard [--seconds 5] [--budget-ms 500]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import requests

from bench.hook_throughput import FIXTURE, ROOT, free_port, start, stop, tokens, wrk
from tests.support.fault_server import FaultModelServer
from tests.support.tokens import SigningKey, clients_document

SERVICE = "/cds-services/cardiovascular-risk"
FAULTS = [
    ("healthy", None),
    ("slow", "2x budget"),
    ("trickle", None),
    ("hang", None),
    ("refuse", None),
    ("reset", None),
    ("error500", None),
    ("malformed", None),
    ("wrong-shape", None),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--budget-ms", type=int, default=500)
    parser.add_argument("--breaker", choices=("on", "off"), default="off")
    args = parser.parse_args()

    key = SigningKey.generate()
    work = Path(tempfile.mkdtemp(prefix="bench-ai-"))
    (work / "clients.json").write_text(json.dumps(clients_document(key, [])))
    body_file = work / "body.json"
    body_file.write_text(FIXTURE.read_text())
    (work / "none.txt").write_text("")
    model = FaultModelServer()
    model.start()
    breaker = {} if args.breaker == "on" else {"BREAKER_WINDOW": "10000", "BREAKER_MIN_CALLS": "10000"}
    rows = []

    def gateway_env(port: int, **extra: str) -> dict[str, str]:
        return {
            "INSTANCE_PATH": str(work),
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
            "CDS_CLIENTS_FILE": str(work / "clients.json"),
            "AUDIT_LOG": str(work / "audit.jsonl"),
            "LOG_LEVEL": "ERROR",
            "HOOK_BUDGET_MS": str(args.budget_ms),
            "LATE_RESULT_TTL_S": "0",
            **extra,
        }

    def measure(label: str, port: int) -> None:
        base = f"http://127.0.0.1:{port}"
        token_file = work / f"tokens-{label}.txt"
        token_file.write_text("\n".join(tokens(key, 4000 * args.seconds, base + SERVICE)))
        result = wrk(base, SERVICE, body_file, token_file, args.seconds, args.connections)
        rows.append((label, result))
        print(f"{label:28} {result}", flush=True)

    subprocess.run(
        [str(ROOT / ".venv/bin/flask"), "--app", "app", "db", "upgrade"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, **gateway_env(0)},
    )
    echo_port = free_port()
    echo = start("bench.echo_app:app", echo_port, {})
    try:
        rows.append(
            (
                "bare echo",
                wrk(
                    f"http://127.0.0.1:{echo_port}",
                    "/echo",
                    body_file,
                    work / "none.txt",
                    args.seconds,
                    args.connections,
                ),
            )
        )
        print(f"{'bare echo':28} {rows[-1][1]}", flush=True)
        port = free_port()
        local = start("app:create_app()", port, gateway_env(port))
        try:
            measure("in-process model", port)
        finally:
            stop(local)
        port = free_port()
        remote = start("app:create_app()", port, gateway_env(port, AI_BACKEND="kserve", AI_URL=model.url, **breaker))
        try:
            for mode, _ in FAULTS:
                model.set_mode(mode, delay_ms=2 * args.budget_ms if mode == "slow" else None)
                measure(f"remote: {mode}", port)
            model.set_mode("healthy")
        finally:
            stop(remote)
        port = free_port()
        tight = {"BREAKER_WINDOW": "4", "BREAKER_MIN_CALLS": "4", "BREAKER_OPEN_SECONDS": "3600"}
        opened = start("app:create_app()", port, gateway_env(port, AI_BACKEND="kserve", AI_URL=model.url, **tight))
        try:
            model.set_mode("error500")
            base = f"http://127.0.0.1:{port}"
            for token in tokens(key, 20, base + SERVICE):  # open the breaker in both workers
                requests.post(
                    base + SERVICE,
                    data=body_file.read_bytes(),
                    timeout=10,
                    headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                )
            calls = model.calls
            measure("remote: breaker open", port)
            print(f"model calls while open: {model.calls - calls}")
        finally:
            stop(opened)
    finally:
        stop(echo)
        model.stop()

    echo_rps = rows[0][1]["rps"]
    print(
        f"\nhook budget {args.budget_ms} ms, {args.connections} connections, {args.seconds} s each, "
        f"breaker {'as configured' if args.breaker == 'on' else 'never opens (fault costs)'}, ES384 client JWT"
    )
    print(f"{'':28}{'req/s':>9}{'ratio':>8}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}")
    for label, r in rows:
        print(f"{label:28}{r['rps']:>9.0f}{r['rps'] / echo_rps:>8.2f}{r['p50']:>9.1f}{r['p99']:>9.1f}{r['errors']:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
