"""The KServe v2 backend against real HTTP servers: the embedded-model server, and a fault-injecting one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
import requests
from werkzeug.serving import make_server

from app.ai import InvalidModelInput, ModelUnavailable
from app.ai.kserve import KServeBackend, encode_tensors, pooled_session
from app.ai.models.pce import NAME, VERSION, PooledCohortEquations
from app.ai.serve import create_model_server
from tests.conftest import require
from tests.support.assertions import wait_for
from tests.support.fault_server import FaultModelServer
from tests.support.processes import free_port

PROJECT = Path(__file__).resolve().parents[2]
INPUTS = {
    "age": 55,
    "sex": "female",
    "race": "other",
    "total_cholesterol": 213,
    "hdl": 50,
    "systolic_bp": 120,
    "treated_hypertension": False,
    "smoker": False,
    "diabetes": False,
}
TIMEOUT = 0.3


def expected_outputs(inputs=INPUTS) -> dict:
    return PooledCohortEquations().predict(inputs)


def call(backend: KServeBackend, inputs=INPUTS, timeout=TIMEOUT):
    """The exception ``infer`` raised (or its Prediction) and how long it took."""
    started = time.monotonic()
    try:
        result = backend.infer(NAME, inputs, timeout=timeout)
    except (ModelUnavailable, InvalidModelInput) as exc:
        result = exc
    return result, time.monotonic() - started


@pytest.fixture(scope="module")
def model_server_url():
    """``create_model_server()`` on werkzeug's threaded server, as ``flask models serve`` runs it."""
    server = make_server("127.0.0.1", 0, create_model_server(), threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def backend(model_server_url):
    with pooled_session() as session:
        yield KServeBackend(model_server_url, session=session)


@pytest.fixture
def fault_server():
    with FaultModelServer() as server:
        yield server


@pytest.fixture
def fault_backend(fault_server):
    with pooled_session() as session:
        yield KServeBackend(fault_server.url, session=session)


# The embedded-model server over the network.


@pytest.mark.parametrize("race", ["white", "african-american", "other"])
def test_pce_outputs_round_trip_over_http(backend, race):
    inputs = {**INPUTS, "race": race}

    prediction = backend.infer(NAME, inputs)

    assert (prediction.model, prediction.version) == (NAME, VERSION)
    assert prediction.outputs == expected_outputs(inputs)


def test_concurrent_calls_share_the_pool(backend):
    with ThreadPoolExecutor(max_workers=32) as pool:
        predictions = list(pool.map(lambda _: backend.infer(NAME, INPUTS, timeout=5), range(128)))

    assert all(p.outputs == expected_outputs() for p in predictions)


def test_input_the_model_rejects_is_invalid_input_named_without_its_value(backend):
    with pytest.raises(InvalidModelInput) as raised:
        backend.infer(NAME, {**INPUTS, "age": 31.5})

    assert "age" in str(raised.value)
    assert "31.5" not in str(raised.value)


def test_an_unencodable_input_is_invalid_before_any_call():
    backend = KServeBackend("http://127.0.0.1:9")  # discard port: nothing is sent

    with pytest.raises(InvalidModelInput, match="age"):
        backend.infer(NAME, {**INPUTS, "age": float("nan")})


def test_unknown_model_is_unavailable(backend):
    with pytest.raises(ModelUnavailable) as raised:
        backend.infer("no-such-model", INPUTS)

    assert raised.value.reason == "unavailable"


def test_ready_says_which_models_answer(backend):
    assert backend.ready(NAME) is True
    assert backend.ready("no-such-model") is False


def test_ready_is_false_when_nothing_listens():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    assert KServeBackend(f"http://127.0.0.1:{port}").ready(NAME) is False


# The v2 protocol as the embedded-model server speaks it (to any v2 client, not only ours).


def post_infer(url: str, body: dict | bytes, path: str = f"/v2/models/{NAME}/infer") -> requests.Response:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return requests.post(url + path, data=data, timeout=5)


def test_infer_echoes_the_id_and_always_names_the_version(model_server_url):
    response = post_infer(model_server_url, {"id": "req-42", "inputs": encode_tensors(INPUTS)})

    body = response.json()
    assert response.status_code == 200
    assert (body["id"], body["model_name"], body["model_version"]) == ("req-42", NAME, VERSION)


def test_versioned_path_answers_for_the_current_version_only(model_server_url):
    ok = post_infer(model_server_url, {"inputs": encode_tensors(INPUTS)}, f"/v2/models/{NAME}/versions/{VERSION}/infer")
    old = post_infer(model_server_url, {"inputs": encode_tensors(INPUTS)}, f"/v2/models/{NAME}/versions/0/infer")

    assert ok.status_code == 200
    assert "id" not in ok.json()
    assert old.status_code == 404
    assert "version" in old.json()["error"]


def test_requested_outputs_limit_the_answer(model_server_url):
    response = post_infer(model_server_url, {"inputs": encode_tensors(INPUTS), "outputs": [{"name": "risk"}]})

    assert [t["name"] for t in response.json()["outputs"]] == ["risk"]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{not json", "malformed request"),
        ({"inputs": "age"}, "malformed request"),
        (
            {"inputs": [{"name": "age", "shape": [2], "datatype": "FP64", "data": [55.0]}]},
            "invalid input: tensor 'age'",
        ),
        ({"inputs": encode_tensors({**INPUTS, "hdl": 5})}, "invalid input: hdl"),
    ],
)
def test_bad_requests_get_400_with_a_v2_error_body(model_server_url, body, error):
    response = post_infer(model_server_url, body)

    assert response.status_code == 400
    assert response.json()["error"].startswith(error)


def test_unknown_model_gets_404_with_a_v2_error_body(model_server_url):
    response = post_infer(model_server_url, {"inputs": []}, "/v2/models/nope/infer")

    assert response.status_code == 404
    assert response.json() == {"error": "unknown model 'nope'"}


def test_health_and_metadata_endpoints(model_server_url):
    get = lambda path: requests.get(model_server_url + path, timeout=5)  # noqa: E731

    assert get("/v2/health/live").status_code == 200
    assert get("/v2/health/ready").status_code == 200
    assert get(f"/v2/models/{NAME}/versions/{VERSION}/ready").status_code == 200
    assert get(f"/v2/models/{NAME}").json()["versions"] == [VERSION]
    assert get("/v2/nowhere").json() == {"error": "not found"}


# Every fault, mapped to the reason the guard understands.


def test_healthy_fault_server_answers_like_the_model(fault_server, fault_backend):
    result, _ = call(fault_backend)

    assert result.outputs == expected_outputs()
    assert fault_server.calls == 1


@pytest.mark.parametrize("mode", ["slow", "hang", "stall"])
def test_no_answer_times_out_within_the_socket_timeout(fault_server, fault_backend, mode):
    """``stall`` times out while the body streams, which requests reports as a ConnectionError, not a Timeout."""
    fault_server.set_mode(mode, delay_ms=5000)

    result, elapsed = call(fault_backend)

    assert isinstance(result, ModelUnavailable) and result.reason == "timeout"
    # Kept on purpose, generous: the server would answer after 5 s; giving up well before shows the 0.3 s
    # timeout ended the call, not the server's pace (nor the backend's 5 s default).
    assert TIMEOUT <= elapsed < 2.0


def test_slow_answer_within_the_timeout_succeeds(fault_server, fault_backend):
    fault_server.set_mode("slow", delay_ms=100)

    result, _ = call(fault_backend, timeout=1.0)

    assert result.outputs == expected_outputs()


def test_trickle_is_not_bounded_by_socket_timeouts(fault_server, fault_backend):
    """One byte every 100 ms restarts a 300 ms read timeout each time, so the call runs past its timeout until the
    server stops trickling (after 2 s here): this is why the guard waits on a future with the remaining deadline."""
    fault_server.set_mode("trickle")
    stopper = threading.Timer(2.0, fault_server.set_mode, ("healthy",))
    stopper.start()
    try:
        result, elapsed = call(fault_backend)
    finally:
        stopper.cancel()

    assert isinstance(result, ModelUnavailable)
    # Kept on purpose: this documents the transport's limit (the call outlives its 0.3 s timeout by far) that
    # the guard's own deadline exists for; the upper bound is generous.
    assert 1.5 < elapsed < 5.0


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("reset", "unavailable"),
        ("error500", "unavailable"),
        ("malformed", "bad-response"),
        ("wrong-shape", "bad-response"),
    ],
)
def test_broken_answers_map_to_their_reason_at_once(fault_server, fault_backend, mode, reason):
    fault_server.set_mode(mode)

    result, _ = call(fault_backend)

    assert isinstance(result, ModelUnavailable) and result.reason == reason  # not "timeout": no waiting
    assert fault_server.calls == 1  # and no retry


def test_refused_connection_is_unavailable_and_reaches_nothing(fault_server, fault_backend):
    fault_server.set_mode("refuse")

    result, _ = call(fault_backend)

    assert isinstance(result, ModelUnavailable) and result.reason == "unavailable"
    assert fault_server.calls == 0


def test_server_listens_again_after_refusing(fault_server, fault_backend):
    fault_server.set_mode("refuse")
    call(fault_backend)
    fault_server.set_mode("healthy")

    result, _ = call(fault_backend)

    assert result.outputs == expected_outputs()
    assert fault_backend.ready(NAME) is True


def test_invalid_input_through_the_fault_server_is_not_a_model_failure(fault_server, fault_backend):
    result, _ = call(fault_backend, {**INPUTS, "systolic_bp": 250})

    assert isinstance(result, InvalidModelInput)


def test_ready_is_false_while_the_server_hangs(fault_server, fault_backend):
    fault_server.set_mode("hang")
    started = time.monotonic()

    assert fault_backend.ready(NAME) is False
    # Kept on purpose, generous: the server hangs for 60 s and the backend's timeout is 5 s; ending well before
    # shows ready() used its own short (1 s) timeout.
    assert time.monotonic() - started < 3.0


def test_stopping_does_not_wait_for_hung_or_trickling_connections():
    server = FaultModelServer()
    server.start()
    backend = KServeBackend(server.url)
    clients = []
    for count, mode in enumerate(("hang", "stall", "trickle"), start=1):
        server.set_mode(mode)
        clients.append(threading.Thread(target=call, args=(backend, INPUTS, 10.0), daemon=True))
        clients[-1].start()
        wait_for(lambda n=count: server.calls == n, f"the {mode} request did not reach the server")

    started = time.monotonic()
    server.stop()

    # Kept on purpose, generous: the clients would wait 10 s and a hang lasts 60 s; stopping well before
    # shows stop() closed the open connections instead of waiting for them.
    assert time.monotonic() - started < 3.0
    for client in clients:
        client.join(timeout=2.0)
        assert not client.is_alive()


# Responses that are valid HTTP but not a usable v2 answer.


RISK = encode_tensors({"risk": 0.1})


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        pytest.param(200, {"model_name": NAME, "outputs": RISK}, "bad-response", id="no-version"),
        pytest.param(200, {"model_name": "x", "model_version": "1", "outputs": RISK}, "bad-response", id="other-model"),
        pytest.param(200, {"model_name": NAME, "model_version": "1", "outputs": []}, "bad-response", id="no-outputs"),
        pytest.param(
            200, {"model_name": NAME, "model_version": "1", "id": "old", "outputs": RISK}, "bad-response", id="other-id"
        ),
        pytest.param(200, [1, 2, 3], "bad-response", id="not-an-object"),
        pytest.param(400, {"error": "unexpected shape for input 'age'"}, "unavailable", id="400-not-invalid-input"),
        pytest.param(404, {"error": "unknown model"}, "unavailable", id="404"),
        pytest.param(503, {"error": "model is loading"}, "unavailable", id="503"),
    ],
)
def test_unusable_answers(httpserver, status, body, reason):
    httpserver.expect_oneshot_request(f"/v2/models/{NAME}/infer", method="POST").respond_with_json(body, status)

    result, _ = call(KServeBackend(httpserver.url_for("/")), timeout=2.0)

    assert isinstance(result, ModelUnavailable) and result.reason == reason


def test_400_saying_invalid_input_names_only_the_inputs(httpserver):
    error = {"error": "invalid input: systolic_bp 250 is outside 90–200 mm Hg"}
    httpserver.expect_oneshot_request(f"/v2/models/{NAME}/infer", method="POST").respond_with_json(error, 400)

    result, _ = call(KServeBackend(httpserver.url_for("/")), timeout=2.0)

    assert isinstance(result, InvalidModelInput)
    assert str(result) == f"{NAME} rejected its input (systolic_bp)"


# The command line.


def test_flask_models_serve_answers_v2(tmp_path):
    try:
        from app import create_app

        create_app({"INSTANCE_PATH": str(tmp_path / "check"), "AUDIT_LOG": str(tmp_path / "check" / "audit.jsonl")})
    except ImportError as exc:
        require(f"the application does not start yet: {exc}")
    port = free_port()
    env = {**os.environ, "INSTANCE_PATH": str(tmp_path / "instance"), "AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    flask = [sys.executable, "-m", "flask", "--app", "app", "models", "serve", "--port", str(port)]
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(flask, cwd=PROJECT, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        backend = KServeBackend(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 20
        while not backend.ready(NAME):
            if process.poll() is not None:
                pytest.fail(f"flask models serve exited: {log.read_text()[-2000:]}")
            assert time.monotonic() < deadline, "flask models serve did not become ready in 20 s"
            time.sleep(0.1)

        prediction = backend.infer(NAME, INPUTS)

        assert (prediction.version, prediction.outputs) == (VERSION, expected_outputs())
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_the_development_model_server_refuses_to_listen_beyond_this_host(tmp_path, host):
    env = {**os.environ, "INSTANCE_PATH": str(tmp_path / "instance"), "AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    flask = [sys.executable, "-m", "flask", "--app", "app", "models", "serve", "--host", host, "--port", "1"]
    done = subprocess.run(flask, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--host" in done.stderr and "gunicorn 'app.ai.serve:create_model_server()'" in done.stderr
