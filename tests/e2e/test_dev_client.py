"""`gateway dev client` prints a curl that really gets a card from the real server; its token works once only."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess

import pytest

from app import devtools
from tests.support.processes import free_port, gunicorn


def dev_command(make_app, base_url: str, *args: str) -> str:
    """Run ``gateway dev ...`` (the Flask CLI, in process) as a developer on this machine would; its stdout."""
    app = make_app(PUBLIC_BASE_URL=base_url)
    if "dev" not in app.cli.commands:
        devtools.init_cli(app)
    result = app.test_cli_runner().invoke(args=["dev", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def printed_curls(output: str) -> list[str]:
    """The curl command blocks as printed: each from a line starting with curl through its continuation lines."""
    lines, blocks = output.splitlines(), []
    for start, line in enumerate(lines):
        if line.strip().startswith("curl "):
            end = start
            while lines[end].endswith("\\"):
                end += 1
            blocks.append("\n".join(lines[start : end + 1]))
    return blocks


def printed_start_line(output: str) -> str:
    return next(line.strip() for line in output.splitlines() if line.strip().endswith(" make run"))


def run_in_shell(command: str, env: dict[str, str] | None = None) -> dict:
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def served(tmp_path, make_app):
    """The gateway under gunicorn on a free port, trusting the clients file `dev client` wrote; and its output."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    port = free_port()
    base = f"http://localhost:{port}"
    output = dev_command(make_app, base, "client")
    start_line = printed_start_line(output)
    setting, make, run = shlex.split(start_line)
    assert (make, run) == ("make", "run")
    clients_file = setting.removeprefix("CDS_CLIENTS_FILE=")
    # The same instance folder and database as the command's, as `make run` and `gateway dev client` share them.
    env = {
        "PUBLIC_BASE_URL": base,
        "CDS_CLIENTS_FILE": clients_file,
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}",
        "AUDIT_LOG": str(tmp_path / "audit.jsonl"),
        "HOST": "127.0.0.1",
        "WEB_CONCURRENCY": "2",
    }
    with gunicorn(env, port):
        yield base, output, env


@pytest.mark.slow
def test_the_printed_curl_gets_a_card_from_the_real_server(served):
    _base, output, _env = served
    signed, _fresh = printed_curls(output)
    answer = run_in_shell(signed)
    (card,) = answer["cards"]
    assert card["indicator"] in ("info", "warning", "critical")
    assert "risk" in card["summary"].lower()


@pytest.mark.slow
def test_the_printed_token_is_refused_the_second_time_and_dev_token_gives_one_that_works(served, make_app):
    base, output, _env = served
    curl, _fresh = printed_curls(output)
    assert "cards" in run_in_shell(curl)
    replayed = run_in_shell(curl)
    assert replayed["resourceType"] == "OperationOutcome"
    assert replayed["issue"][0]["code"] == "login"

    printed_token = curl.split("Authorization: Bearer ")[1].split("'")[0]
    fresh = dev_command(make_app, base, "token").strip()
    assert fresh != printed_token and fresh.count(".") == 2
    answer = run_in_shell(curl.replace(printed_token, fresh))
    assert answer["cards"], answer


@pytest.mark.slow
def test_the_printed_curl_that_signs_a_token_per_call_works_every_time(served, make_app):
    if "dev" not in make_app().cli.commands:
        pytest.skip("app/__init__.py does not register the dev commands yet (devtools.init_cli)")
    _base, output, env = served
    _signed, fresh = printed_curls(output)
    assert "dev token)" in fresh
    shell_env = {**os.environ, **{k: env[k] for k in ("PUBLIC_BASE_URL", "INSTANCE_PATH", "DATABASE_URL", "AUDIT_LOG")}}
    shell_env.pop("CDS_CLIENTS_FILE", None)
    for _ in range(2):
        assert run_in_shell(fresh, shell_env)["cards"]
