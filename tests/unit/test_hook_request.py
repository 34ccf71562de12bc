"""parse_hook_request: what a service call must contain (R-3, R-6, R-7, R-15 and the hook context table)."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from app.cds.errors import BadHookRequest
from app.cds.request import parse_hook_request

TOKEN = "some-opaque-fhir-access-token-3f9a"
BUNDLE = {"resourceType": "Bundle", "type": "collection", "entry": []}

# The smallest valid context of each standard hook (checklist table).
CONTEXTS: dict[str, dict[str, Any]] = {
    "patient-view": {"userId": "Practitioner/example", "patientId": "1288992"},
    "order-select": {
        "userId": "Practitioner/example",
        "patientId": "1288992",
        "selections": ["MedicationRequest/smart-MedicationRequest-103"],
        "draftOrders": BUNDLE,
    },
    "order-sign": {"userId": "Practitioner/example", "patientId": "1288992", "draftOrders": BUNDLE},
    "appointment-book": {"userId": "PractitionerRole/A2340113", "patientId": "1288992", "appointments": BUNDLE},
    "encounter-start": {"userId": "Practitioner/example", "patientId": "1288992", "encounterId": "456"},
    "encounter-discharge": {"userId": "Practitioner/example", "patientId": "1288992", "encounterId": "456"},
    "order-dispatch": {
        "patientId": "1288992",
        "dispatchedOrders": ["ServiceRequest/proc002"],
        "performer": "Organization/some-performer",
    },
    "medication-refill": {"patientId": "1288992", "medications": BUNDLE},
}
REQUIRED = {
    "patient-view": ["userId", "patientId"],
    "order-select": ["userId", "patientId", "selections", "draftOrders"],
    "order-sign": ["userId", "patientId", "draftOrders"],
    "appointment-book": ["userId", "patientId", "appointments"],
    "encounter-start": ["userId", "patientId", "encounterId"],
    "encounter-discharge": ["userId", "patientId", "encounterId"],
    "order-dispatch": ["patientId", "dispatchedOrders", "performer"],
    "medication-refill": ["patientId", "medications"],
}
REQUIRED_FIELDS = [(hook, name) for hook, names in REQUIRED.items() for name in names]


def call(hook: str = "patient-view", /, **members: Any) -> dict[str, Any]:
    """A valid service call body for ``hook`` (with a FHIR token), updated with ``members``."""
    body: dict[str, Any] = {
        "hook": hook,
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "fhirServer": "https://fhir.example.org/r4",
        "fhirAuthorization": {
            "access_token": TOKEN,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "user/Patient.read user/Observation.read",
            "subject": "cds-service4",
        },
        "context": copy.deepcopy(CONTEXTS[hook]),
        "prefetch": {"patient": {"resourceType": "Patient", "id": "1288992"}},
    }
    body.update(members)
    return body


def without(body: dict[str, Any], *path: str) -> dict[str, Any]:
    """``body`` with the member at ``path`` removed."""
    body = copy.deepcopy(body)
    holder = body
    for name in path[:-1]:
        holder = holder[name]
    del holder[path[-1]]
    return body


def parse(body: dict[str, Any], expected_hook: str | None = None):
    return parse_hook_request(orjson.dumps(body), expected_hook)


def rejected(body: dict[str, Any] | bytes, expected_hook: str | None = None) -> BadHookRequest:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    with pytest.raises(BadHookRequest) as info:
        parse_hook_request(raw, expected_hook)
    return info.value


# --- the body as a whole ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"{not json", b'{"hook": "patient-view",}', b"\xff\xfe"], ids=repr)
def test_body_that_is_not_json_is_rejected_naming_body(raw):
    assert rejected(raw).expression == "body"


@pytest.mark.parametrize("raw", [b"[]", b'"patient-view"', b"42", b"null", b"true"], ids=repr)
def test_body_that_is_not_a_json_object_is_rejected_naming_body(raw):
    assert rejected(raw).expression == "body"


def test_bad_request_is_a_400():
    assert rejected(b"").status == 400


def test_valid_patient_view_call_is_parsed():
    request = parse(call(context={**CONTEXTS["patient-view"], "encounterId": "89284"}))

    assert request.hook == "patient-view"
    assert request.hook_instance == "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea"
    assert (request.user_id, request.patient_id, request.encounter_id) == ("Practitioner/example", "1288992", "89284")
    assert request.fhir_server == "https://fhir.example.org/r4"
    assert request.fhir_authorization.access_token == TOKEN
    assert request.fhir_authorization.expires_in == 300
    assert request.prefetch == {"patient": {"resourceType": "Patient", "id": "1288992"}}


def test_call_without_fhir_server_authorization_or_prefetch_is_valid():
    body = without(without(without(call(), "fhirServer"), "fhirAuthorization"), "prefetch")

    request = parse(body)

    assert (request.fhir_server, request.fhir_authorization, request.prefetch) == (None, None, {})


def test_trailing_slash_of_fhir_server_is_removed():
    assert parse(call(fhirServer="https://fhir.example.org/r4/")).fhir_server == "https://fhir.example.org/r4"


# --- hook, hookInstance, context ---------------------------------------------------------------------------------


def test_missing_hook_is_rejected_naming_hook():
    assert rejected(without(call(), "hook")).expression == "hook"


@pytest.mark.parametrize("hook", [42, "", ["patient-view"], None], ids=repr)
def test_hook_that_is_not_a_non_empty_string_is_rejected_naming_hook(hook):
    assert rejected(call(hook=hook)).expression == "hook"


def test_hook_other_than_the_services_hook_is_rejected_naming_hook():
    assert rejected(call(), expected_hook="order-sign").expression == "hook"


def test_hook_matching_the_services_hook_is_accepted():
    assert parse(call("order-sign"), expected_hook="order-sign").hook == "order-sign"


def test_missing_hook_instance_is_rejected_naming_hook_instance():
    assert rejected(without(call(), "hookInstance")).expression == "hookInstance"


@pytest.mark.parametrize("instance", [42, "", {"id": "x"}], ids=repr)
def test_hook_instance_that_is_not_a_string_is_rejected_naming_hook_instance(instance):
    assert rejected(call(hookInstance=instance)).expression == "hookInstance"


def test_missing_context_is_rejected_naming_context():
    assert rejected(without(call(), "context")).expression == "context"


@pytest.mark.parametrize("context", [[], "patient-view", None], ids=repr)
def test_context_that_is_not_an_object_is_rejected_naming_context(context):
    assert rejected(call(context=context)).expression == "context"


@pytest.mark.parametrize("hook", sorted(CONTEXTS))
def test_minimal_context_of_each_standard_hook_is_accepted(hook):
    assert parse(call(hook), expected_hook=hook).context == CONTEXTS[hook]


@pytest.mark.parametrize(("hook", "name"), REQUIRED_FIELDS, ids=[f"{h}-{n}" for h, n in REQUIRED_FIELDS])
def test_missing_required_context_field_is_rejected_naming_it(hook, name):
    assert rejected(without(call(hook), "context", name)).expression == f"context.{name}"


@pytest.mark.parametrize(("hook", "name"), REQUIRED_FIELDS, ids=[f"{h}-{n}" for h, n in REQUIRED_FIELDS])
def test_null_required_context_field_is_rejected_naming_it(hook, name):
    body = call(hook)
    body["context"][name] = None
    assert rejected(body).expression == f"context.{name}"


@pytest.mark.parametrize(
    ("hook", "name", "value"),
    [
        ("patient-view", "patientId", 1288992),
        ("patient-view", "patientId", "  "),
        ("patient-view", "userId", {"reference": "Practitioner/example"}),
        ("order-sign", "draftOrders", [BUNDLE]),
        ("order-sign", "draftOrders", "Bundle/1"),
        ("order-select", "selections", "MedicationRequest/1"),
        ("appointment-book", "appointments", []),
        ("encounter-discharge", "encounterId", 456),
        ("order-dispatch", "dispatchedOrders", "ServiceRequest/proc002"),
        ("order-dispatch", "performer", {"reference": "Organization/1"}),
        ("medication-refill", "medications", []),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_required_context_field_of_the_wrong_json_type_is_rejected_naming_it(hook, name, value):
    body = call(hook)
    body["context"][name] = value
    assert rejected(body).expression == f"context.{name}"


@pytest.mark.parametrize(
    ("hook", "name", "value"),
    [
        ("patient-view", "encounterId", 89284),
        ("order-sign", "encounterId", ["89284"]),
        ("order-dispatch", "fulfillmentTasks", {"resourceType": "Task"}),
        ("medication-refill", "userId", 7),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_optional_context_field_of_the_wrong_json_type_is_rejected_naming_it(hook, name, value):
    body = call(hook)
    body["context"][name] = value
    assert rejected(body).expression == f"context.{name}"


def test_medication_refill_without_user_id_is_accepted():
    assert parse(call("medication-refill")).user_id is None


def test_medication_refill_with_user_id_is_accepted():
    body = call("medication-refill")
    body["context"]["userId"] = "Practitioner/example"
    assert parse(body).user_id == "Practitioner/example"


def test_order_dispatch_without_user_id_is_accepted():
    assert parse(call("order-dispatch")).user_id is None


def test_optional_context_field_sent_as_null_is_treated_as_absent():
    body = call()
    body["context"]["encounterId"] = None
    assert parse(body).encounter_id is None


def test_hook_not_in_the_standard_library_needs_only_a_context_object():
    assert parse(call(hook="com.example.custom-hook", context={"anything": 1})).context == {"anything": 1}


@pytest.mark.parametrize("user_id", ["Practitioner/1", "PractitionerRole/2", "Patient/3", "RelatedPerson/4"])
def test_user_id_of_each_user_type_is_accepted(user_id):
    body = call()
    body["context"]["userId"] = user_id
    assert parse(body).user_id == user_id


@pytest.mark.parametrize(
    "user_id",
    ["Device/1", "Organization/1", "example", "practitioner/1", "https://ehr.example.org/fhir/Practitioner/1"],
)
def test_user_id_that_is_not_a_user_reference_is_rejected_naming_user_id(user_id):
    body = call()
    body["context"]["userId"] = user_id
    assert rejected(body).expression == "context.userId"


@pytest.mark.parametrize("user_id", ["Practitioner", "Practitioner/"])
def test_user_id_without_an_id_is_rejected_naming_user_id(user_id):
    body = call()
    body["context"]["userId"] = user_id
    assert rejected(body).expression == "context.userId"


# --- fhirServer and fhirAuthorization (R-6, R-7) -----------------------------------------------------------------


def test_fhir_authorization_without_fhir_server_is_rejected_naming_fhir_server():
    assert rejected(without(call(), "fhirServer")).expression == "fhirServer"


@pytest.mark.parametrize("server", [42, "", ["https://fhir.example.org"]], ids=repr)
def test_fhir_server_that_is_not_a_string_is_rejected_naming_fhir_server(server):
    assert rejected(call(fhirServer=server)).expression == "fhirServer"


@pytest.mark.parametrize("auth", ["Bearer abc", [], 42], ids=repr)
def test_fhir_authorization_that_is_not_an_object_is_rejected_naming_it(auth):
    assert rejected(call(fhirAuthorization=auth)).expression == "fhirAuthorization"


@pytest.mark.parametrize("name", ["access_token", "token_type", "expires_in", "scope", "subject"])
def test_fhir_authorization_without_a_required_member_is_rejected_naming_it(name):
    assert rejected(without(call(), "fhirAuthorization", name)).expression == f"fhirAuthorization.{name}"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("access_token", 12345),
        ("access_token", ""),
        ("scope", ["user/Patient.read"]),
        ("expires_in", "300"),
        ("expires_in", True),
        ("subject", None),
        ("patient", 1288992),
    ],
    ids=repr,
)
def test_fhir_authorization_member_of_the_wrong_type_is_rejected_naming_it(name, value):
    body = call()
    body["fhirAuthorization"][name] = value
    assert rejected(body).expression == f"fhirAuthorization.{name}"


@pytest.mark.parametrize("token_type", ["MAC", "DPoP", "Basic"])
def test_token_type_other_than_bearer_is_rejected_naming_token_type(token_type):
    body = call()
    body["fhirAuthorization"]["token_type"] = token_type
    assert rejected(body).expression == "fhirAuthorization.token_type"


def test_token_type_bearer_is_accepted_in_any_case():
    body = call()
    body["fhirAuthorization"]["token_type"] = "bearer"
    assert parse(body).fhir_authorization.token_type == "bearer"


def test_fhir_authorization_patient_is_kept():
    body = call()
    body["fhirAuthorization"]["patient"] = "1288992"
    assert parse(body).fhir_authorization.patient == "1288992"


def test_access_token_never_appears_in_the_repr_of_the_parsed_request():
    request = parse(call())

    assert TOKEN not in repr(request)
    assert TOKEN not in str(request)
    assert TOKEN not in repr(request.fhir_authorization)


def test_access_token_never_appears_in_an_error_message():
    body = call()
    body["fhirAuthorization"]["expires_in"] = TOKEN

    error = rejected(body)

    assert TOKEN not in str(error)
    assert TOKEN not in error.diagnostics


# --- prefetch (R-6, R-13) -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefetch", [[], "Patient/1", 42], ids=repr)
def test_prefetch_that_is_not_an_object_is_rejected_naming_prefetch(prefetch):
    assert rejected(call(prefetch=prefetch)).expression == "prefetch"


@pytest.mark.parametrize("value", [[], "Patient/1288992", 42, True], ids=repr)
def test_prefetch_value_that_is_not_an_object_or_null_is_rejected_naming_its_key(value):
    assert rejected(call(prefetch={"patient": {"resourceType": "Patient"}, "meds": value})).expression == (
        "prefetch.meds"
    )


def test_null_prefetch_value_is_kept_as_none():
    request = parse(call(prefetch={"patient": None}))
    assert "patient" in request.prefetch
    assert request.prefetch["patient"] is None


def test_prefetch_sent_as_null_is_treated_as_no_prefetch():
    assert parse(call(prefetch=None)).prefetch == {}


def test_operation_outcome_prefetch_value_is_accepted():
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]}
    assert parse(call(prefetch={"patient": outcome})).prefetch["patient"] == outcome


# --- unknown members (R-3) ----------------------------------------------------------------------------------------


def test_unknown_members_at_every_level_are_ignored():
    body = call(
        extension={"com.example.flag": True},
        somethingFrom30={"version": "3.0"},
    )
    body["context"]["com.example.extra"] = ["x"]
    body["fhirAuthorization"]["id_token"] = "ignored"

    request = parse(body, expected_hook="patient-view")

    assert request.patient_id == "1288992"
    assert not hasattr(request, "extension")


# --- ids that reach the database, and the prefetch Bundle's skeleton (issue 9, item 4) ---------------------------


@pytest.mark.parametrize(
    "value",
    ["gw-test\x00patient", "a b", "Patient/1", "x" * 65, "ü", "1;2", "\t1", "１２"],
    ids=["nul", "space", "slash", "65-chars", "non-ascii", "semicolon", "tab", "fullwidth-digits"],
)
@pytest.mark.parametrize("name", ["patientId", "encounterId"])
def test_a_patient_or_encounter_id_that_is_not_a_fhir_id_is_rejected_naming_it(name, value):
    body = call()
    body["context"][name] = value
    assert rejected(body).expression == f"context.{name}"


@pytest.mark.parametrize("value", ["a", "x" * 64, "A-z.0-9", "smart-1288992", "0f9d7c2e-1c4b-4e3a-9a55-8a9c3b7d2f10"])
def test_fhir_ids_of_one_to_64_letters_digits_dashes_and_dots_are_accepted(value):
    body = call()
    body["context"]["patientId"] = value
    body["context"]["encounterId"] = value
    assert (parse(body).patient_id, parse(body).encounter_id) == (value, value)


@pytest.mark.parametrize("user_id", ["Practitioner/a\x00", "Practitioner/a b", "Practitioner/" + "x" * 65])
def test_a_user_id_whose_id_is_not_a_fhir_id_is_rejected_naming_it(user_id):
    body = call()
    body["context"]["userId"] = user_id
    assert rejected(body).expression == "context.userId"


@pytest.mark.parametrize("instance", ["d1577c69\x00", "line\nbreak", "\x1b[2J", "x" * 201])
def test_a_hook_instance_with_control_characters_or_too_long_is_rejected_naming_it(instance):
    assert rejected(call(hookInstance=instance)).expression == "hookInstance"


@pytest.mark.parametrize(
    "server",
    [
        "ftp://fhir.example.org",
        "fhir.example.org/r4",
        "http://",
        "http:///r4",
        "http://[::1/r4",
        "https://fhir.example.org/r4\x00",
        "http://a b/fhir",
    ],
    ids=repr,
)
def test_a_fhir_server_that_is_not_an_absolute_http_url_is_rejected_naming_it(server):
    assert rejected(call(fhirServer=server)).expression == "fhirServer"


def bundle_prefetch(**bundle: Any) -> dict[str, Any]:
    entries = [{"resource": {"resourceType": "Condition", "id": str(i)}} for i in range(3)]
    return {"conditions": {"resourceType": "Bundle", "type": "searchset", "entry": entries, **bundle}}


@pytest.mark.parametrize("entry", [{"resource": {}}, "entries", 42, True], ids=repr)
def test_a_bundle_entry_that_is_not_an_array_is_rejected_naming_it(entry):
    assert rejected(call(prefetch=bundle_prefetch(entry=entry))).expression == "prefetch.conditions.entry"


@pytest.mark.parametrize("item", ["Condition/2", 42, None, []], ids=repr)
def test_a_bundle_entry_that_is_not_an_object_is_rejected_naming_its_index(item):
    prefetch = bundle_prefetch()
    prefetch["conditions"]["entry"][2] = item
    assert rejected(call(prefetch=prefetch)).expression == "prefetch.conditions.entry[2]"


@pytest.mark.parametrize("resource", ["Condition/2", 42, [], {"id": "2"}, {"resourceType": 7}], ids=repr)
def test_an_entry_resource_that_is_not_a_resource_is_rejected_naming_it(resource):
    prefetch = bundle_prefetch()
    prefetch["conditions"]["entry"][2]["resource"] = resource
    assert rejected(call(prefetch=prefetch)).expression.startswith("prefetch.conditions.entry[2].resource")


@pytest.mark.parametrize(
    ("link", "expression"),
    [
        ({"relation": "next"}, "prefetch.conditions.link"),
        ("next", "prefetch.conditions.link"),
        (["https://fhir.example.org/r4/Condition?page=2"], "prefetch.conditions.link[0]"),
        ([{"relation": "next", "url": 42}], "prefetch.conditions.link[0].url"),
        ([{"relation": ["next"], "url": "https://x"}], "prefetch.conditions.link[0].relation"),
    ],
    ids=repr,
)
def test_a_bundle_link_of_the_wrong_shape_is_rejected_naming_it(link, expression):
    assert rejected(call(prefetch=bundle_prefetch(link=link))).expression == expression


def test_a_prefetch_value_without_a_resource_type_is_rejected_naming_it():
    assert rejected(call(prefetch={"patient": {"id": "1288992"}})).expression == "prefetch.patient.resourceType"


def test_a_bundle_with_null_or_absent_entries_links_and_resources_is_accepted():
    prefetch = bundle_prefetch(link=None)
    prefetch["conditions"]["entry"][1] = {"fullUrl": "urn:uuid:1", "resource": None}
    prefetch["empty"] = {"resourceType": "Bundle", "type": "searchset", "entry": None}
    prefetch["paged"] = bundle_prefetch(link=[{"relation": "next", "url": "https://x/p2"}])["conditions"]
    assert set(parse(call(prefetch=prefetch)).prefetch) == {"conditions", "empty", "paged"}
