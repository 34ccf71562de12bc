"""patient-view with full prefetch vs a bare Flask JSON echo, same gunicorn configuration, same run.

Both servers run under `app/gunicorn_conf.py` (gthread). wrk drives 16 connections at each in turn, several
rounds, and the medians are reported: requests/s, the gateway/echo ratio, p50 and p99. Every gateway request
carries its own freshly signed client JWT (the replay cache rejects a reused jti), so authentication is
measured too.

    make bench            # or: .venv/bin/python -m bench.hook_throughput --rounds 3 --seconds 10

``--replay host,memory,redis`` runs one gateway per jti replay store, each against the same echo baseline:
``host`` (the default without Redis: the host state file shared by the workers), ``memory`` (per process, as
before the host file: the cost baseline, not a safe setting), ``redis`` (REDIS_URL on 127.0.0.1:6379).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from tests.support.processes import free_port
from tests.support.tokens import SigningKey, clients_document

ROOT = Path(__file__).resolve().parent.parent
WRK_THREADS = 2
FIXTURE = ROOT / "fixtures" / "hooks" / "patient-view-cardiovascular-risk.json"
# jti replay store -> (app spec, extra environment)
REPLAY_VARIANTS = {
    "host": ("app:create_app()", {}),
    "memory": ("bench.replay_variants:per_process_app()", {}),
    "redis": ("app:create_app()", {"REDIS_URL": "redis://127.0.0.1:6379/0"}),
}


def start(app_spec: str, port: int, env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(ROOT / ".venv/bin/gunicorn"), "-c", str(ROOT / "app/gunicorn_conf.py"), app_spec],
        cwd=ROOT,
        env={**os.environ, **env, "PORT": str(port), "HOST": "127.0.0.1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"{app_spec} did not start on port {port}")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def probe(url: str, key: SigningKey, body_file: Path) -> None:
    """One call before measuring: the gateway answers cards (and the first validations are warm)."""
    answer = requests.post(
        url,
        data=body_file.read_bytes(),
        timeout=10,
        headers={"Authorization": f"Bearer {key.token(url)}", "Content-Type": "application/json"},
    )
    answer.raise_for_status()
    print(f"{url} answers: {answer.json()['cards'][0]['summary']}")


def tokens(key: SigningKey, n: int, aud: str) -> list[str]:
    return [key.token(aud, lifetime=600) for _ in range(n)]


LUA = """
-- Each wrk thread takes every THREADS-th token from its own offset, so no token (jti) is ever sent twice.
local THREADS = %(threads)d
local next_id = 0
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end

local tokens = {}
for line in io.lines("%(tokens)s") do tokens[#tokens + 1] = line end
local body = io.open("%(body)s"):read("*a")
local i = nil
request = function()
  i = (i or id) + THREADS
  local headers = {["Content-Type"] = "application/json"}
  if #tokens > 0 then headers["Authorization"] = "Bearer " .. tokens[(i %% #tokens) + 1] end
  return wrk.format("POST", "%(path)s", headers, body)
end
"""


def wrk(url: str, path: str, body_file: Path, token_file: Path, seconds: int, connections: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA % {"tokens": token_file, "body": body_file, "path": path, "threads": WRK_THREADS})
    out = subprocess.run(
        ["wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script.name, url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    ).stdout
    os.unlink(script.name)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": _ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1)),
        "p99": _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1)),
        "errors": int(non2xx.group(1)) if non2xx else 0,
    }


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--auth",
        default="ES384",
        choices=("ES384", "RS384", "off"),
        help="client JWT algorithm (ES384 is the Sandbox's), or off: CDS_AUTH=off, no token",
    )
    parser.add_argument(
        "--replay",
        default="host",
        help="comma-separated jti replay stores to measure, one gateway each: host, memory, redis",
    )
    args = parser.parse_args()
    variants = [v.strip() for v in args.replay.split(",") if v.strip()]
    unknown = set(variants) - set(REPLAY_VARIANTS)
    if unknown or not variants:
        parser.error(f"--replay takes host, memory and redis (got {args.replay!r})")

    key = SigningKey.generate("RS384" if args.auth == "RS384" else "ES384")
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    clients = work / "clients.json"
    clients.write_text(json.dumps(clients_document(key, [])))
    body_file = work / "body.json"
    body_file.write_text(FIXTURE.read_text())
    no_tokens = work / "none.txt"
    no_tokens.write_text("")

    echo_port = free_port()
    ports = {name: free_port() for name in variants}
    service_path = "/cds-services/cardiovascular-risk"
    env = {
        "INSTANCE_PATH": str(work),
        "CDS_CLIENTS_FILE": str(clients),
        "AUDIT_LOG": str(work / "audit.jsonl"),
        "LOG_LEVEL": "WARNING",
        "CDS_AUTH": "off" if args.auth == "off" else "on",
    }
    subprocess.run(
        [str(ROOT / ".venv/bin/flask"), "--app", "app", "db", "upgrade"],
        cwd=ROOT,
        env={**os.environ, **env},
        check=True,
        capture_output=True,
    )
    servers = {"echo": start("bench.echo_app:app", echo_port, env)}
    names = ["echo"] + [f"gateway ({name})" for name in variants]
    results: dict[str, list[dict]] = {name: [] for name in names}
    try:
        for name in variants:
            spec, extra = REPLAY_VARIANTS[name]
            base = f"http://127.0.0.1:{ports[name]}"
            servers[name] = start(spec, ports[name], {**env, **extra, "PUBLIC_BASE_URL": base})
            probe(base + service_path, key, body_file)
        # One token per request, with headroom: rps is well under 5,000 on this machine.
        per_round = 5000 * args.seconds
        for r in range(args.rounds):
            echo = wrk(f"http://127.0.0.1:{echo_port}", "/echo", body_file, no_tokens, args.seconds, args.connections)
            results["echo"].append(echo)
            line = [f"round {r + 1}: echo {echo}"]
            for name in variants:
                base = f"http://127.0.0.1:{ports[name]}"
                token_file = work / f"tokens-{name}-{r}.txt"
                signed = [] if args.auth == "off" else tokens(key, per_round, base + service_path)
                token_file.write_text("\n".join(signed))
                got = wrk(base, service_path, body_file, token_file, args.seconds, args.connections)
                results[f"gateway ({name})"].append(got)
                line.append(f"{name} {got}")
            print(", ".join(line), flush=True)
    finally:
        for proc in servers.values():
            stop(proc)

    def median(name: str, field: str) -> float:
        return statistics.median(x[field] for x in results[name])

    print(
        f"\npatient-view with full prefetch ({body_file.stat().st_size // 1024} KB body), auth {args.auth}, "
        f"{args.connections} connections, {args.rounds} x {args.seconds} s, medians:"
    )
    print(f"{'':20}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'non-2xx':>10}{'/echo':>8}")
    for name in names:
        ratio = median(name, "rps") / median("echo", "rps")
        print(
            f"{name:20}{median(name, 'rps'):>10.0f}{median(name, 'p50'):>10.2f}{median(name, 'p99'):>10.2f}"
            f"{sum(x['errors'] for x in results[name]):>10}{ratio:>8.2f}"
        )
    if "memory" in variants:
        for name in variants:
            if name != "memory":
                ratio = median(f"gateway ({name})", "rps") / median("gateway (memory)", "rps")
                print(f"replay store {name} vs per-process memory (req/s): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
