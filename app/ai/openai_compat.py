"""An OpenAI-compatible chat-completions backend for the ``discharge-summary`` model (``LLM_URL``, ``LLM_MODEL``).

Every failure becomes ``ModelUnavailable(reason)`` (timeout, unavailable, overloaded, bad-response) or, for a 400,
``InvalidModelInput``; no retries here (the job ledger retries). Neither the inputs nor the generated text are
ever logged or put in an exception message: both are PHI.
"""

from __future__ import annotations

from typing import Any

import orjson
import requests

from app import http
from app.ai.models.discharge_summary import NAME, SECTION_TITLES
from app.ai.remote import bad_response, json_object, transport_failure
from app.ai.types import InvalidModelInput, ModelUnavailable, Prediction

POOL_SIZE = 8
CONNECT_TIMEOUT = 3.0
DEFAULT_TIMEOUT = 60.0

SYSTEM_PROMPT = (
    "You draft hospital discharge summaries for clinician review. Use ONLY the facts in the JSON the user sends "
    "(the encounter, patient age and gender, conditions, procedures, medications and results recorded for one "
    "encounter). Do not add, infer or guess any diagnosis, procedure, medication, dose, result, date or plan that "
    "is not in the data. Write plain text, no Markdown, with these section headings in this order, each on its "
    "own line: " + "; ".join(SECTION_TITLES) + ". Under a heading with nothing in the data, write "
    '"None recorded". List medications whose status is stopped, completed or cancelled under the stopped '
    "heading, the others under medications at discharge. Begin with the line "
    '"AI-generated DRAFT for clinician review, not a final document."'
)


def completions_url(base_url: str) -> str:
    """``{base_url}/v1/chat/completions``, without doubling a ``/v1`` the base URL already ends with."""
    base = base_url.rstrip("/")
    return f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"


class ChatCompletionsBackend:
    """Drafts discharge summaries with a model behind ``POST /v1/chat/completions``, over pooled connections."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        session: requests.Session | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        self.url = completions_url(base_url)
        self.model_id = model
        self._session = session if session is not None else http.pooled_session(POOL_SIZE, hosts=1)
        self._timeout = timeout
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def __repr__(self) -> str:  # never the key
        return f"ChatCompletionsBackend({self.url!r}, {self.model_id!r})"

    def request_body(self, inputs: dict[str, Any]) -> bytes:
        """The chat request: the system prompt, then the facts as compact JSON (sorted keys: same facts, same bytes)."""
        try:
            facts = orjson.dumps(inputs, option=orjson.OPT_SORT_KEYS).decode()
        except TypeError:  # orjson.JSONEncodeError
            raise InvalidModelInput("inputs cannot be encoded as JSON") from None
        return orjson.dumps(
            {
                "model": self.model_id,
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": f"Encounter facts (JSON):\n{facts}"},
                ],
                "temperature": 0,
            }
        )

    def infer(self, model: str, inputs: dict[str, Any], timeout: float | None = None) -> Prediction:
        """One chat completion, bounded per socket operation by ``timeout``; the guard bounds the total."""
        if model != NAME:
            raise ModelUnavailable("unknown-model", model)
        if not isinstance(inputs, dict):
            raise InvalidModelInput("inputs must be an object")
        timeout = self._timeout if timeout is None else timeout
        if timeout <= 0:
            raise ModelUnavailable("timeout", "no time left for the call")
        body = self.request_body(inputs)
        try:
            response = self._session.post(
                self.url,
                data=body,
                headers=self._headers,
                timeout=(min(CONNECT_TIMEOUT, timeout), timeout),
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise transport_failure(exc) from None
        if response.status_code == 400:
            raise InvalidModelInput(f"{NAME}: the model endpoint rejected the request (HTTP 400)")
        if response.status_code == 429:
            raise ModelUnavailable("overloaded", "HTTP 429")
        if response.status_code != 200:
            raise ModelUnavailable("unavailable", f"HTTP {response.status_code}")
        return self._prediction(response.content)

    def _prediction(self, content: bytes) -> Prediction:
        body = json_object(content)
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise bad_response("response has no choices")
        message = choices[0].get("message")
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise bad_response("response has no content")
        version = body.get("model")
        version = version if isinstance(version, str) and version.strip() else self.model_id
        return Prediction(model=NAME, version=version, outputs={"text": text, "sections": []})
