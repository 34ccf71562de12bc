"""The OpenAI-compatible chat-completions backend against a real local HTTP server playing the LLM."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from werkzeug import Request, Response

from app.ai import InvalidModelInput, ModelUnavailable
from app.ai.openai_compat import SYSTEM_PROMPT, ChatCompletionsBackend, completions_url
from tests.support.processes import free_port

PATH = "/v1/chat/completions"
MODEL = "draft-writer-7b"
INPUTS = {
    "encounter": {"id": "enc-1", "type": "Hospital admission", "reason": ["Community acquired pneumonia"]},
    "patient": {"age": 69, "gender": "female"},
    "conditions": [{"text": "Community acquired pneumonia", "code": "385093006"}],
}
DRAFT = "AI-generated DRAFT for clinician review, not a final document.\n\nEncounter\nType: Hospital admission\n"


def completion(content=DRAFT, model="draft-writer-7b-2024-06") -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    }


@pytest.fixture
def llm(make_httpserver):
    make_httpserver.clear()
    yield make_httpserver
    make_httpserver.clear()


def backend(server, **kwargs) -> ChatCompletionsBackend:
    return ChatCompletionsBackend(server.url_for("/"), MODEL, **kwargs)


def failure(server, timeout=2.0, **kwargs) -> Exception:
    with pytest.raises((ModelUnavailable, InvalidModelInput)) as info:
        backend(server, **kwargs).infer("discharge-summary", INPUTS, timeout=timeout)
    return info.value


def test_success_sends_the_expected_request(llm, caplog):
    seen: list[Request] = []

    def handler(request: Request) -> Response:
        seen.append(request)
        return Response(json.dumps(completion()), content_type="application/json")

    llm.expect_oneshot_request(PATH, method="POST").respond_with_handler(handler)
    caplog.set_level(logging.DEBUG)
    prediction = backend(llm, api_key="sk-test-key").infer("discharge-summary", INPUTS, timeout=2.0)

    assert prediction.model == "discharge-summary"
    assert prediction.version == "draft-writer-7b-2024-06"
    assert prediction.outputs == {"text": DRAFT, "sections": []}
    (request,) = seen
    assert request.headers["Authorization"] == "Bearer sk-test-key"
    assert request.headers["Content-Type"] == "application/json"
    body = json.loads(request.get_data())
    assert body["model"] == MODEL
    assert body["temperature"] == 0
    system, user = body["messages"]
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    assert user["role"] == "user"
    assert user["content"].split("\n", 1)[1] == json.dumps(INPUTS, separators=(",", ":"), sort_keys=True)
    # neither the facts nor the draft reach the logs
    assert "pneumonia" not in caplog.text and "DRAFT" not in caplog.text


def test_the_system_prompt_asks_for_a_draft_from_the_facts_only():
    for phrase in ("ONLY the facts", "plain text", "None recorded", "DRAFT for clinician review", "Key results"):
        assert phrase in SYSTEM_PROMPT


def test_no_key_no_authorization_header_and_configured_model_as_version(llm):
    seen: list[Request] = []

    def handler(request: Request) -> Response:
        seen.append(request)
        body = completion()
        del body["model"]
        return Response(json.dumps(body), content_type="application/json")

    llm.expect_oneshot_request(PATH, method="POST").respond_with_handler(handler)
    prediction = backend(llm).infer("discharge-summary", INPUTS, timeout=2.0)
    assert prediction.version == MODEL
    assert "Authorization" not in seen[0].headers


def test_a_base_url_ending_in_v1_is_not_doubled(llm):
    llm.expect_oneshot_request(PATH, method="POST").respond_with_json(completion())
    prediction = ChatCompletionsBackend(llm.url_for("/v1/"), MODEL).infer("discharge-summary", INPUTS, timeout=2.0)
    assert prediction.outputs["text"] == DRAFT
    assert completions_url("http://llm:8000") == "http://llm:8000/v1/chat/completions"
    assert completions_url("http://llm:8000/v1") == "http://llm:8000/v1/chat/completions"
    assert completions_url("http://llm:8000/openai/v1/") == "http://llm:8000/openai/v1/chat/completions"


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (429, {"error": {"message": "rate limited"}}, "overloaded"),
        (500, {"error": {"message": "boom"}}, "unavailable"),
        (503, "upstream down", "unavailable"),
        (200, "{not json", "bad-response"),
        (200, ["a", "list"], "bad-response"),
        (200, {"choices": []}, "bad-response"),
        (200, {"choices": [{"message": {"role": "assistant"}}]}, "bad-response"),
        (200, completion(content="   "), "bad-response"),
        (200, completion(content=None), "bad-response"),
    ],
)
def test_unusable_answers_map_to_a_reason(llm, status, body, reason):
    data = body if isinstance(body, str) else json.dumps(body)
    llm.expect_oneshot_request(PATH, method="POST").respond_with_data(data, status, content_type="application/json")
    exc = failure(llm)
    assert isinstance(exc, ModelUnavailable)
    assert exc.reason == reason
    assert "pneumonia" not in str(exc)


def test_400_is_invalid_input(llm):
    llm.expect_oneshot_request(PATH, method="POST").respond_with_json(
        {"error": {"message": "context length exceeded for Community acquired pneumonia"}}, 400
    )
    exc = failure(llm)
    assert isinstance(exc, InvalidModelInput)
    assert "pneumonia" not in str(exc)


def test_a_slow_server_times_out_within_the_timeout(llm):
    release = threading.Event()

    def slow(request: Request) -> Response:
        release.wait(10)
        return Response(json.dumps(completion()), content_type="application/json")

    llm.expect_oneshot_request(PATH, method="POST").respond_with_handler(slow)
    timeout = 0.5
    started = time.monotonic()
    try:
        exc = failure(llm, timeout=timeout)
    finally:
        release.set()
    elapsed = time.monotonic() - started
    assert isinstance(exc, ModelUnavailable) and exc.reason == "timeout"
    # Kept on purpose, generous: the server would answer after 10 s; giving up well before shows the call's own
    # 0.5 s timeout ended it, not the server's pace.
    assert elapsed < 2.5


def test_nothing_listening_is_unavailable():
    with pytest.raises(ModelUnavailable) as info:
        ChatCompletionsBackend(f"http://127.0.0.1:{free_port()}", MODEL).infer("discharge-summary", INPUTS, timeout=1.0)
    assert info.value.reason == "unavailable"


def test_other_models_are_unknown(llm):
    with pytest.raises(ModelUnavailable) as info:
        backend(llm).infer("ascvd-pce", {}, timeout=1.0)
    assert info.value.reason == "unknown-model"
    assert llm.log == []


def test_no_time_left_is_a_timeout_without_a_call(llm):
    with pytest.raises(ModelUnavailable) as info:
        backend(llm).infer("discharge-summary", INPUTS, timeout=0)
    assert info.value.reason == "timeout"
    assert llm.log == []
