"""Parsing and validating a CDS Hooks service call (R-6) before any other work is done."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from app.cds.errors import BadHookRequest

# Required and optional context fields per standard hook, with the JSON type each must have.
_STRING, _ARRAY, _OBJECT = str, list, dict
HOOK_CONTEXT: dict[str, tuple[dict[str, type], dict[str, type]]] = {
    "patient-view": ({"userId": _STRING, "patientId": _STRING}, {"encounterId": _STRING}),
    "order-select": (
        {"userId": _STRING, "patientId": _STRING, "selections": _ARRAY, "draftOrders": _OBJECT},
        {"encounterId": _STRING},
    ),
    "order-sign": (
        {"userId": _STRING, "patientId": _STRING, "draftOrders": _OBJECT},
        {"encounterId": _STRING},
    ),
    "appointment-book": (
        {"userId": _STRING, "patientId": _STRING, "appointments": _OBJECT},
        {"encounterId": _STRING},
    ),
    "encounter-start": ({"userId": _STRING, "patientId": _STRING, "encounterId": _STRING}, {}),
    "encounter-discharge": ({"userId": _STRING, "patientId": _STRING, "encounterId": _STRING}, {}),
    "order-dispatch": (
        {"patientId": _STRING, "dispatchedOrders": _ARRAY, "performer": _STRING},
        {"fulfillmentTasks": _ARRAY},
    ),
    "medication-refill": (
        {"patientId": _STRING, "medications": _OBJECT},
        {"userId": _STRING, "encounterId": _STRING},
    ),
}
_JSON_TYPE = {str: "a string", list: "an array", dict: "an object"}
_USER_TYPES = ("Practitioner", "PractitionerRole", "Patient", "RelatedPerson")


@dataclass
class FhirAuthorization:
    """The hook's transient FHIR token (R-7): used for this call only, never logged or stored."""

    access_token: str = field(repr=False)
    token_type: str
    expires_in: int
    scope: str
    subject: str
    patient: str | None = None


@dataclass
class HookRequest:
    """A validated hook call. Unknown members are ignored (R-3)."""

    hook: str
    hook_instance: str
    context: dict[str, Any]
    fhir_server: str | None = None
    fhir_authorization: FhirAuthorization | None = None
    prefetch: dict[str, Any] = field(default_factory=dict)

    @property
    def user_id(self) -> str | None:
        return self.context.get("userId")

    @property
    def patient_id(self) -> str | None:
        return self.context.get("patientId")

    @property
    def encounter_id(self) -> str | None:
        return self.context.get("encounterId")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Decode a request body that must be a JSON object."""
    if not body:
        raise BadHookRequest("The request body is empty; a JSON object is required", "body")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadHookRequest(f"The request body is not valid JSON: {exc}", "body") from None
    if not isinstance(data, dict):
        raise BadHookRequest("The request body must be a JSON object", "body")
    return data


def _require(data: dict[str, Any], name: str, kind: type, where: str = "") -> Any:
    path = f"{where}{name}"
    if name not in data or data[name] is None:
        raise BadHookRequest(f"{path} is required", path)
    value = data[name]
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise BadHookRequest(f"{path} must be {_JSON_TYPE[kind]}{' (non-empty)' if kind is str else ''}", path)
    return value


def _optional(data: dict[str, Any], name: str, kind: type, where: str = "") -> Any:
    if data.get(name) is None:
        return None
    return _require(data, name, kind, where)


def _check_context(hook: str, context: dict[str, Any]) -> None:
    required, optional = HOOK_CONTEXT.get(hook, ({}, {}))
    for name, kind in required.items():
        _require(context, name, kind, "context.")
    for name, kind in optional.items():
        _optional(context, name, kind, "context.")
    user_id = context.get("userId")
    kind, _, ident = user_id.partition("/") if isinstance(user_id, str) else ("", "", "x")
    if isinstance(user_id, str) and (kind not in _USER_TYPES or not ident.strip()):
        raise BadHookRequest("context.userId must be a relative reference such as Practitioner/123", "context.userId")


def _parse_authorization(data: dict[str, Any]) -> FhirAuthorization | None:
    auth = _optional(data, "fhirAuthorization", dict)
    if auth is None:
        return None
    where = "fhirAuthorization."
    token_type = _require(auth, "token_type", str, where)
    if token_type.lower() != "bearer":
        raise BadHookRequest("fhirAuthorization.token_type must be Bearer", "fhirAuthorization.token_type")
    expires_in = auth.get("expires_in")
    if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)):
        raise BadHookRequest("fhirAuthorization.expires_in must be a number", "fhirAuthorization.expires_in")
    return FhirAuthorization(
        access_token=_require(auth, "access_token", str, where),
        token_type=token_type,
        expires_in=int(expires_in),
        scope=_require(auth, "scope", str, where),
        subject=_require(auth, "subject", str, where),
        patient=_optional(auth, "patient", str, where),
    )


def parse_hook_request(body: bytes, expected_hook: str | None = None) -> HookRequest:
    """Validate a service call body; raise BadHookRequest naming the first offending field."""
    data = parse_json_object(body)
    hook = _require(data, "hook", str)
    if expected_hook is not None and hook != expected_hook:
        raise BadHookRequest(f"hook is {hook!r} but this service answers {expected_hook!r}", "hook")
    hook_instance = _require(data, "hookInstance", str)
    context = _require(data, "context", dict)
    _check_context(hook, context)
    fhir_server = _optional(data, "fhirServer", str)
    authorization = _parse_authorization(data)
    if authorization is not None and fhir_server is None:
        raise BadHookRequest("fhirServer is required when fhirAuthorization is present", "fhirServer")
    prefetch = _optional(data, "prefetch", dict) or {}
    for key, value in prefetch.items():
        if value is not None and not isinstance(value, dict):
            raise BadHookRequest(f"prefetch.{key} must be a FHIR resource or null", f"prefetch.{key}")
    return HookRequest(
        hook=hook,
        hook_instance=hook_instance,
        context=context,
        fhir_server=fhir_server.rstrip("/") if fhir_server else None,
        fhir_authorization=authorization,
        prefetch=prefetch,
    )
