"""Parsing and validating a CDS Hooks service call (R-6) before any other work is done."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

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
# FHIR's id grammar: what patientId, encounterId and the id in userId are (and all that may reach the database).
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# C0 and C1 control characters (NUL included): never part of an identifier or a URL.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# RFC 6750 section 2.1 b64token: all an access token may hold to travel in an Authorization header as it is.
B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# RFC 6749 section 3.3 scope: scope-tokens of printable ASCII (no '"' or '\\'), separated by spaces.
SCOPE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]+")
MAX_HOOK_INSTANCE = 200
MAX_URL = 2048


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
    for name in ("patientId", "encounterId"):
        value = context.get(name)
        if value is not None and not (isinstance(value, str) and FHIR_ID.fullmatch(value)):
            raise BadHookRequest(
                f"context.{name} must be a FHIR id: 1 to 64 letters, digits, '-' or '.'", f"context.{name}"
            )
    user_id = context.get("userId")
    kind, _, ident = user_id.partition("/") if isinstance(user_id, str) else ("", "", "x")
    if isinstance(user_id, str) and (kind not in _USER_TYPES or not FHIR_ID.fullmatch(ident)):
        raise BadHookRequest(
            "context.userId must be a relative reference to a user with a FHIR id, such as Practitioner/123",
            "context.userId",
        )


def _check_text(value: str, path: str, max_length: int) -> str:
    """An identifier such as hookInstance: bounded, and nothing a log line or a database could choke on."""
    if len(value) > max_length or CONTROL.search(value):
        raise BadHookRequest(f"{path} must be at most {max_length} characters, without control characters", path)
    return value


def _check_fhir_server(value: str) -> str:
    """An absolute http(s) base URL, nothing else: it names the server we may fetch from and is stored with results.
    No query or fragment: paths and searches are appended to it, and could not follow either."""
    try:
        parts = urlsplit(value)
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port  # port: ValueError when out of range
    except ValueError:  # e.g. an unclosed IPv6 bracket
        scheme, host, port = "", None, None
    if (
        scheme not in ("http", "https")
        or not host
        or port == 0
        or len(value) > MAX_URL
        or CONTROL.search(value)
        or any(c.isspace() or c in "?#" for c in value)
    ):
        raise BadHookRequest("fhirServer must be an absolute http(s) URL, without a query or fragment", "fhirServer")
    return value.rstrip("/")


def _parse_authorization(data: dict[str, Any]) -> FhirAuthorization | None:
    """CDS Hooks 2.0 fhirAuthorization: each member of its type, the token one that can be sent as it is."""
    auth = _optional(data, "fhirAuthorization", dict)
    if auth is None:
        return None
    where = "fhirAuthorization."
    # Checked before anything is said about it: a message never quotes the token.
    access_token = _require(auth, "access_token", str, where)
    if not B64TOKEN.fullmatch(access_token):
        raise BadHookRequest(
            "fhirAuthorization.access_token must be a bearer token: letters, digits and -._~+/ then any '='",
            "fhirAuthorization.access_token",
        )
    token_type = _require(auth, "token_type", str, where)
    if token_type.lower() != "bearer":
        raise BadHookRequest("fhirAuthorization.token_type must be Bearer", "fhirAuthorization.token_type")
    scope = _require(auth, "scope", str, where)
    if not SCOPE.fullmatch(scope):
        raise BadHookRequest(
            "fhirAuthorization.scope must be space-separated OAuth scopes (printable ASCII)", "fhirAuthorization.scope"
        )
    patient = _optional(auth, "patient", str, where)
    if patient is not None and not FHIR_ID.fullmatch(patient):
        raise BadHookRequest("fhirAuthorization.patient must be a FHIR id", "fhirAuthorization.patient")
    return FhirAuthorization(
        access_token=access_token,
        token_type=token_type,
        expires_in=_seconds(auth.get("expires_in"), "fhirAuthorization.expires_in"),
        scope=scope,
        subject=_require(auth, "subject", str, where),
        patient=patient,
    )


def _seconds(value: Any, path: str) -> int:
    """A lifetime in whole seconds (an integer; 300.0 is read as 300)."""
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or value < 0:
        raise BadHookRequest(f"{path} must be a whole number of seconds, 0 or more", path)
    return int(value)


def _is_resource(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("resourceType"), str) and bool(value["resourceType"])


def _not_a_resource(value: Any, path: str) -> BadHookRequest:
    if not isinstance(value, dict):
        return BadHookRequest(f"{path} must be a FHIR resource (an object)", path)
    return BadHookRequest(f"{path}.resourceType must be a non-empty string", f"{path}.resourceType")


def _array_of_objects(bundle: dict[str, Any], name: str, path: str) -> list[dict[str, Any]]:
    items = bundle.get(name)
    if items is None:
        return []
    if not isinstance(items, list):
        raise BadHookRequest(f"{path}.{name} must be an array", f"{path}.{name}")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadHookRequest(f"{path}.{name}[{i}] must be an object", f"{path}.{name}[{i}]")
    return items


def _check_prefetch_value(value: Any, path: str) -> None:
    """A prefetch value is null or a FHIR resource; a Bundle's skeleton (entry, resource, link) is checked so that
    no later step meets an entry that is not an object (R-6). Paths are built only for the error (hook path)."""
    if value is None:
        return
    if not _is_resource(value):
        raise _not_a_resource(value, path)
    if value["resourceType"] != "Bundle":
        return
    for i, entry in enumerate(_array_of_objects(value, "entry", path)):
        resource = entry.get("resource")
        if resource is not None and not _is_resource(resource):
            raise _not_a_resource(resource, f"{path}.entry[{i}].resource")
    for i, link in enumerate(_array_of_objects(value, "link", path)):
        for member in ("relation", "url"):
            if link.get(member) is not None and not isinstance(link[member], str):
                raise BadHookRequest(f"{path}.link[{i}].{member} must be a string", f"{path}.link[{i}].{member}")


def parse_hook_request(body: bytes, expected_hook: str | None = None) -> HookRequest:
    """Validate a service call body; raise BadHookRequest naming the first offending field."""
    data = parse_json_object(body)
    hook = _require(data, "hook", str)
    if expected_hook is not None and hook != expected_hook:
        raise BadHookRequest(f"hook is {hook!r} but this service answers {expected_hook!r}", "hook")
    hook_instance = _check_text(_require(data, "hookInstance", str), "hookInstance", MAX_HOOK_INSTANCE)
    context = _require(data, "context", dict)
    _check_context(hook, context)
    fhir_server = _optional(data, "fhirServer", str)
    authorization = _parse_authorization(data)
    if authorization is not None and fhir_server is None:
        raise BadHookRequest("fhirServer is required when fhirAuthorization is present", "fhirServer")
    prefetch = _optional(data, "prefetch", dict) or {}
    for key, value in prefetch.items():
        _check_prefetch_value(value, f"prefetch.{key}")
    return HookRequest(
        hook=hook,
        hook_instance=hook_instance,
        context=context,
        fhir_server=_check_fhir_server(fhir_server) if fhir_server is not None else None,
        fhir_authorization=authorization,
        prefetch=prefetch,
    )
