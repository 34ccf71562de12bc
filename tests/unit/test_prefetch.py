"""Prefetch (R-11..R-14): templates, and resolving keys against a real local FHIR-ish HTTP server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from app.cds.errors import PrefetchUnavailable
from app.cds.prefetch import PrefetchResolver, TemplateUnresolvable, check_template, fhir_access, render
from app.cds.request import HookRequest, parse_hook_request
from app.cds.service import PrefetchKey
from app.fhir.client import next_link, pooled_session

TOKEN = "opaque-token-7c1e"
PATIENT = {"resourceType": "Patient", "id": "123", "name": [{"family": "Chalmers"}]}


# --- render and check_template (R-11, R-12) -----------------------------------------------------------------------


def test_render_substitutes_a_context_field():
    assert render("Patient/{{context.patientId}}", {"patientId": "123"}) == "Patient/123"


def test_render_substitutes_every_token_of_a_template():
    template = "Encounter?patient={{context.patientId}}&_id={{context.encounterId}}"
    assert render(template, {"patientId": "123", "encounterId": "e9"}) == "Encounter?patient=123&_id=e9"


def test_render_allows_whitespace_inside_the_braces():
    assert render("Patient/{{ context.patientId  }}", {"patientId": "123"}) == "Patient/123"


@pytest.mark.parametrize(
    ("user_id", "token"),
    [
        ("Practitioner/123", "userPractitionerId"),
        ("PractitionerRole/123", "userPractitionerRoleId"),
        ("Patient/123", "userPatientId"),
        ("RelatedPerson/123", "userRelatedPersonId"),
    ],
)
def test_render_derives_the_user_token_from_user_id(user_id, token):
    assert render(f"X/{{{{{token}}}}}", {"userId": user_id}) == "X/123"


def test_user_token_for_another_user_type_has_no_value():
    with pytest.raises(TemplateUnresolvable):
        render("Practitioner/{{userPractitionerId}}", {"userId": "PractitionerRole/123"})


def test_user_token_without_user_id_has_no_value():
    with pytest.raises(TemplateUnresolvable):
        render("Practitioner/{{userPractitionerId}}", {"patientId": "123"})


def test_context_token_without_a_value_is_unresolvable():
    with pytest.raises(TemplateUnresolvable):
        render("Encounter/{{context.encounterId}}", {"patientId": "123"})


@pytest.mark.parametrize("value", ["", None, {"reference": "Patient/1"}, ["1"], True], ids=repr)
def test_context_token_with_a_non_primitive_or_empty_value_is_unresolvable(value):
    with pytest.raises(TemplateUnresolvable):
        render("Patient/{{context.patientId}}", {"patientId": value})


def test_context_values_are_percent_encoded_so_they_cannot_inject_parameters():
    rendered = render("Observation?patient={{context.patientId}}&_count=50", {"patientId": "1&_include=*"})

    assert rendered == "Observation?patient=1%26_include%3D%2A&_count=50"
    assert parse_qs(urlsplit(rendered).query) == {"patient": ["1&_include=*"], "_count": ["50"]}


def test_context_values_are_percent_encoded_so_they_cannot_change_the_path():
    assert render("Patient/{{context.patientId}}", {"patientId": "123/_history?x=1#y"}) == (
        "Patient/123%2F_history%3Fx%3D1%23y"
    )


def test_user_token_values_are_percent_encoded():
    assert render("Practitioner/{{userPractitionerId}}", {"userId": "Practitioner/a b&c"}) == "Practitioner/a%20b%26c"


@pytest.mark.parametrize(
    "template",
    [
        "Patient/{{context.patientId}}",
        "Observation?patient={{context.patientId}}&code=http://loinc.org|2089-1&_sort=-date&_count=10",
        "Practitioner/{{userPractitionerId}}",
        "PractitionerRole/{{userPractitionerRoleId}}",
        "Patient/{{userPatientId}}",
        "RelatedPerson/{{ userRelatedPersonId }}",
        "Condition?patient={{context.patientId}}&encounter={{context.encounterId}}",
    ],
)
def test_check_template_accepts_the_2_0_tokens(template):
    check_template(template)


@pytest.mark.parametrize(
    "template",
    [
        "Observation?patient={{context.patientId}}&date=ge{{today()}}",  # FHIRPath: CDS Hooks 3.0 ballot only
        "Observation?date=ge{{today() - 90 days}}",
        "Patient/{{context.draftOrders.entry.resource.id}}",  # not a root-level context field
        "Patient/{{%patient.id}}",
        "Practitioner/{{userId}}",
        "Patient/{{patientId}}",
    ],
)
def test_check_template_refuses_tokens_2_0_does_not_define(template):
    with pytest.raises(ValueError, match="unknown token"):
        check_template(template)


def test_check_template_refuses_an_unterminated_token():
    with pytest.raises(ValueError):
        check_template("Patient/{{context.patientId")


def test_fhirpath_token_never_renders_into_a_query():
    with pytest.raises(TemplateUnresolvable):
        render("Observation?date=ge{{today()}}", {"patientId": "123"})


# --- a local FHIR-ish server ---------------------------------------------------------------------------------------

# A handler delayed this long answers only when the test ends (its fixture releases it): whatever the machine's
# load, a resolver that returned before it answered did not wait for it.
LONGER_THAN_ANY_TEST = 30.0


class Fhir:
    """A threaded local HTTP server standing in for the client's FHIR server, with helpers for these tests."""

    def __init__(self) -> None:
        self.server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
        self.release = threading.Event()
        self._in_flight = 0
        self.most_in_flight = 0  # the most requests this server held at once since the last reset
        self.answered = 0  # handlers that have returned since the last reset
        self._lock = threading.Lock()

    @property
    def base(self) -> str:
        return self.server.url_for("/fhir")

    def reset(self) -> None:
        self.release.set()  # let slow handlers of the previous test finish now
        deadline = time.monotonic() + 2
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.005)  # the server logs a request just after its handler returns
        self.server.clear()
        self.server.clear_all_handlers()
        self.release = threading.Event()
        self.most_in_flight = self.answered = 0

    def answer(self, path: str, body: Any, status: int = 200, delay: float = 0.0, query_string=None) -> None:
        """Answer GET /fhir/<path> with ``body`` (JSON) after ``delay`` seconds."""
        release = self.release

        def handler(_request: Request) -> Response:
            with self._lock:
                self._in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self._in_flight)
            try:
                if delay:
                    release.wait(delay)
                return Response(orjson.dumps(body), status=status, content_type="application/fhir+json")
            finally:
                with self._lock:
                    self._in_flight -= 1
                    self.answered += 1

        self.server.expect_request(f"/fhir/{path}", method="GET", query_string=query_string).respond_with_handler(
            handler
        )

    def requests(self) -> list[Request]:
        return [request for request, _response in self.server.log]


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Fhir, Fhir]]:
    fhir, other = Fhir(), Fhir()
    fhir.server.start()
    other.server.start()
    yield fhir, other
    for s in (fhir, other):
        s.release.set()
    stopping = [threading.Thread(target=s.server.stop) for s in (fhir, other)]  # each stop can take 0.5 s
    for t in stopping:
        t.start()
    for t in stopping:
        t.join()


@pytest.fixture
def fhir(servers) -> Iterator[Fhir]:
    servers[0].reset()
    yield servers[0]
    servers[0].release.set()


@pytest.fixture
def other(servers) -> Iterator[Fhir]:
    """A second server that no client allowlists."""
    servers[1].reset()
    yield servers[1]
    servers[1].release.set()


@pytest.fixture(scope="module")
def session():
    s = pooled_session()
    yield s
    s.close()


@pytest.fixture(scope="module")
def resolver() -> Iterator[PrefetchResolver]:
    executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="test-prefetch")
    yield PrefetchResolver(executor)
    executor.shutdown(wait=False, cancel_futures=True)


def hook_request(
    fhir_server: str | None,
    token: str | None = TOKEN,
    prefetch: dict[str, Any] | None = None,
    user_id: str = "Practitioner/abc",
) -> HookRequest:
    body: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "context": {"userId": user_id, "patientId": "123"},
    }
    if fhir_server:
        body["fhirServer"] = fhir_server
    if token:
        body["fhirAuthorization"] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "user/*.read",
            "subject": "gateway",
        }
    if prefetch is not None:
        body["prefetch"] = prefetch
    return parse_hook_request(orjson.dumps(body), "patient-view")


def allowlist(*servers: Fhir) -> Callable[[str], bool]:
    bases = [s.base for s in servers]
    return lambda url: any(url == b or url.startswith(b + "/") for b in bases)


def deny_all(_url: str) -> bool:
    return False


@pytest.fixture
def resolve(resolver, session, fhir):
    """Resolve ``templates`` for ``request`` with access limited to ``allows`` (the local server by default)."""

    def run(
        templates: dict[str, PrefetchKey],
        request: HookRequest,
        *,
        allows: Callable[[str], bool] | None = None,
        allow_anonymous: bool = False,
        budget: float = 3.0,
        on_fetch: Callable[[dict[str, Any]], None] = lambda _record: None,
    ):
        access = fhir_access(request, allows or allowlist(fhir), allow_anonymous, session, 5.0)
        return resolver.resolve(templates, request, access, time.monotonic() + budget, on_fetch)

    return run


def keys(required: bool = True, pages: str = "all", **templates: str) -> dict[str, PrefetchKey]:
    return {key: PrefetchKey(template, required=required, pages=pages) for key, template in templates.items()}


def searchset(*resources: dict[str, Any], next_url: str | None = None) -> dict[str, Any]:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": [{"relation": "self", "url": "http://127.0.0.1/fhir/self"}],
        "entry": [{"resource": r} for r in resources],
    }
    if next_url:
        bundle["link"].append({"relation": "next", "url": next_url})
    return bundle


def obs(i: int) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": f"o{i}", "status": "final"}


# --- what the client sent (R-13) --------------------------------------------------------------------------------


def test_sent_prefetch_value_is_kept_and_not_refetched(fhir, resolve):
    fhir.answer("Patient/123", {"resourceType": "Patient", "id": "123", "name": [{"family": "Other"}]})
    request = hook_request(fhir.base, prefetch={"patient": PATIENT})

    result = resolve(keys(patient="Patient/{{context.patientId}}"), request)

    assert result.values == {"patient": PATIENT}
    assert result.unavailable == frozenset()
    assert fhir.requests() == []


def test_null_prefetch_is_not_refetched(fhir, resolve):
    fhir.answer("Patient/123", PATIENT)
    request = hook_request(fhir.base, prefetch={"patient": None})

    result = resolve(keys(patient="Patient/{{context.patientId}}"), request)

    assert result.values == {"patient": None}
    assert result.unavailable == frozenset()
    assert fhir.requests() == []


def test_null_prefetch_satisfies_a_required_key_without_fhir_access(resolve):
    request = hook_request(None, token=None, prefetch={"patient": None})

    result = resolve(keys(patient="Patient/{{context.patientId}}"), request)

    assert result.values == {"patient": None}


@pytest.mark.parametrize(
    "failed",
    [
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]},
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [
                {"resource": {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "x"}]}},
                {"resource": {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "y"}]}},
            ],
        },
    ],
    ids=["operation-outcome", "bundle-of-operation-outcomes"],
)
def test_failed_client_prefetch_is_treated_as_absent_and_refetched(fhir, resolve, failed):
    fhir.answer("Patient/123", PATIENT)
    request = hook_request(fhir.base, prefetch={"patient": failed})

    result = resolve(keys(patient="Patient/{{context.patientId}}"), request)

    assert result.values == {"patient": PATIENT}
    assert [r.path for r in fhir.requests()] == ["/fhir/Patient/123"]


def test_bundle_with_an_operation_outcome_among_results_is_kept(fhir, resolve):
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": obs(1)},
            {"resource": {"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "x"}]}},
        ],
    }
    request = hook_request(fhir.base, prefetch={"observations": bundle})

    result = resolve(keys(observations="Observation?patient={{context.patientId}}"), request)

    assert result.values == {"observations": bundle}
    assert fhir.requests() == []


def test_empty_bundle_sent_by_the_client_is_kept(fhir, resolve):
    bundle = {"resourceType": "Bundle", "type": "searchset", "total": 0}
    request = hook_request(fhir.base, prefetch={"observations": bundle})

    result = resolve(keys(observations="Observation?patient={{context.patientId}}"), request)

    assert result.values == {"observations": bundle}
    assert fhir.requests() == []


# --- fetching what is absent (R-13, R-14) ---------------------------------------------------------------------


def test_absent_key_is_fetched_from_the_fhir_server(fhir, resolve):
    fhir.answer("Patient/123", PATIENT)

    result = resolve(keys(patient="Patient/{{context.patientId}}"), hook_request(fhir.base))

    assert result.values == {"patient": PATIENT}
    assert result.unavailable == frozenset()


def test_search_template_is_fetched_with_its_query(fhir, resolve):
    fhir.answer("Observation", searchset(obs(1)), query_string={"patient": "123", "code": "2089-1"})

    result = resolve(
        keys(observations="Observation?patient={{context.patientId}}&code=2089-1"), hook_request(fhir.base)
    )

    assert [e["resource"]["id"] for e in result.values["observations"]["entry"]] == ["o1"]
    assert fhir.requests()[0].args.to_dict() == {"patient": "123", "code": "2089-1"}


def test_absent_keys_are_fetched_in_parallel(fhir, resolve):
    fhir.answer("Patient/123", PATIENT, delay=0.3)
    fhir.answer("Condition", searchset(), delay=0.3, query_string={"patient": "123"})
    templates = keys(patient="Patient/{{context.patientId}}", conditions="Condition?patient={{context.patientId}}")

    result = resolve(templates, hook_request(fhir.base))

    assert set(result.values) == {"patient", "conditions"}
    assert fhir.most_in_flight == 2, "the two 300 ms fetches did not overlap: not in parallel"


def test_searchset_next_links_are_followed_and_pages_merged(fhir, resolve):
    fhir.answer("Observation", searchset(obs(1), obs(2), next_url=f"{fhir.base}/page-2"), query_string="patient=123")
    fhir.answer("page-2", searchset(obs(3), next_url=f"{fhir.base}/page-3"))
    fhir.answer("page-3", searchset(obs(4)))

    result = resolve(keys(observations="Observation?patient={{context.patientId}}"), hook_request(fhir.base))

    bundle = result.values["observations"]
    assert [e["resource"]["id"] for e in bundle["entry"]] == ["o1", "o2", "o3", "o4"]
    assert next_link(bundle) is None
    assert bundle["type"] == "searchset"


def test_paged_bundle_sent_by_the_client_is_completed(fhir, resolve):
    fhir.answer("page-2", searchset(obs(2)))
    sent = searchset(obs(1), next_url=f"{fhir.base}/page-2")
    request = hook_request(fhir.base, prefetch={"observations": sent})

    result = resolve(keys(observations="Observation?patient={{context.patientId}}"), request)

    assert [e["resource"]["id"] for e in result.values["observations"]["entry"]] == ["o1", "o2"]
    assert next_link(result.values["observations"]) is None
    assert [r.path for r in fhir.requests()] == ["/fhir/page-2"]


def test_next_link_to_a_server_that_is_not_allowlisted_is_not_followed_and_the_first_page_is_kept(fhir, other, resolve):
    other.answer("page-2", searchset(obs(2)))
    fhir.answer("Observation", searchset(obs(1), next_url=f"{other.base}/page-2"), query_string="patient=123")

    result = resolve(
        keys(required=False, observations="Observation?patient={{context.patientId}}"), hook_request(fhir.base)
    )

    assert [e["resource"]["id"] for e in result.values["observations"]["entry"]] == ["o1"]
    assert result.incomplete == {"observations"}
    assert result.unavailable == frozenset()
    assert other.requests() == []


def test_redirect_to_a_server_that_is_not_allowlisted_is_not_followed(fhir, other, resolve):
    other.answer("Patient/123", PATIENT)
    fhir.server.expect_request("/fhir/Patient/123").respond_with_response(
        Response(status=302, headers={"Location": f"{other.base}/Patient/123"})
    )

    result = resolve(keys(required=False, patient="Patient/{{context.patientId}}"), hook_request(fhir.base))

    assert other.requests() == []
    assert result.unavailable == {"patient"}


def test_instance_read_answered_404_is_a_null_value(fhir, resolve):
    fhir.answer("Patient/123", {"resourceType": "OperationOutcome", "issue": []}, status=404)

    result = resolve(keys(patient="Patient/{{context.patientId}}"), hook_request(fhir.base))

    assert result.values == {"patient": None}
    assert result.unavailable == frozenset()


def test_fhir_server_error_makes_an_optional_key_unavailable(fhir, resolve):
    fhir.answer("Patient/123", {"resourceType": "OperationOutcome", "issue": []}, status=500)

    result = resolve(keys(required=False, patient="Patient/{{context.patientId}}"), hook_request(fhir.base))

    assert result.unavailable == {"patient"}
    assert "patient" not in result.values


def test_fhir_server_error_on_a_required_key_is_a_412(fhir, resolve):
    fhir.answer("Patient/123", {"resourceType": "OperationOutcome", "issue": []}, status=500)

    with pytest.raises(PrefetchUnavailable) as info:
        resolve(keys(patient="Patient/{{context.patientId}}"), hook_request(fhir.base))

    assert (info.value.status, info.value.expression) == (412, "prefetch.patient")


def test_unresolvable_template_makes_an_optional_key_unavailable_without_a_request(fhir, resolve):
    request = hook_request(fhir.base, user_id="PractitionerRole/r1")

    result = resolve(keys(required=False, me="Practitioner/{{userPractitionerId}}"), request)

    assert result.unavailable == {"me"}
    assert fhir.requests() == []


# --- how many pages a key needs (first page enough, or every page) -------------------------------------------------

OBSERVATIONS = "Observation?patient={{context.patientId}}&_sort=-date&_count=2"


def ids(value: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in value.get("entry") or ()]


def test_a_sent_first_page_is_enough_for_a_first_page_key_and_no_more_is_fetched(fhir, resolve):
    fhir.answer("page-2", searchset(obs(3)))
    sent = searchset(obs(1), obs(2), next_url=f"{fhir.base}/page-2")
    request = hook_request(fhir.base, prefetch={"observations": sent})

    result = resolve(keys(required=False, pages="first", observations=OBSERVATIONS), request)

    assert ids(result.values["observations"]) == ["o1", "o2"]
    assert result.incomplete == frozenset() and result.unavailable == frozenset()
    assert fhir.requests() == []


def test_a_first_page_key_that_is_fetched_reads_only_the_first_page(fhir, resolve):
    fhir.answer("Observation", searchset(obs(1), obs(2), next_url=f"{fhir.base}/page-2"))
    fhir.answer("page-2", searchset(obs(3)))

    result = resolve(keys(pages="first", observations=OBSERVATIONS), hook_request(fhir.base))

    assert ids(result.values["observations"]) == ["o1", "o2"]
    assert result.incomplete == frozenset()
    assert [r.path for r in fhir.requests()] == ["/fhir/Observation"]


def test_when_the_next_page_fails_the_sent_page_is_used_and_the_key_is_incomplete(fhir, resolve):
    fhir.answer("page-2", {"resourceType": "OperationOutcome", "issue": []}, status=500)
    sent = searchset(obs(1), next_url=f"{fhir.base}/page-2")

    result = resolve(
        keys(conditions="Condition?patient={{context.patientId}}"),
        hook_request(fhir.base, prefetch={"conditions": sent}),
    )

    assert ids(result.values["conditions"]) == ["o1"]
    assert next_link(result.values["conditions"]) is None
    assert result.incomplete == {"conditions"} and result.unavailable == frozenset()


def test_when_the_next_page_misses_the_deadline_the_sent_page_is_used_and_the_key_is_incomplete(fhir, resolve):
    fhir.answer("page-2", searchset(obs(2)), delay=LONGER_THAN_ANY_TEST)
    sent = searchset(obs(1), next_url=f"{fhir.base}/page-2")

    result = resolve(
        keys(conditions="Condition?patient={{context.patientId}}"),
        hook_request(fhir.base, prefetch={"conditions": sent}),
        budget=0.3,
    )

    assert fhir.answered == 0, "the resolver waited for the server instead of its deadline"
    assert ids(result.values["conditions"]) == ["o1"]
    assert result.incomplete == {"conditions"}


def test_when_the_server_may_not_be_called_the_sent_page_is_used_and_the_key_is_incomplete(fhir, resolve):
    sent = searchset(obs(1), next_url=f"{fhir.base}/page-2")

    result = resolve(
        keys(conditions="Condition?patient={{context.patientId}}"),
        hook_request(fhir.base, token=None, prefetch={"conditions": sent}),
    )

    assert ids(result.values["conditions"]) == ["o1"]
    assert result.incomplete == {"conditions"}
    assert fhir.requests() == []


def test_pages_read_before_a_paging_failure_are_kept(fhir, resolve):
    fhir.answer("Condition", searchset(obs(1), next_url=f"{fhir.base}/page-2"), query_string="patient=123")
    fhir.answer("page-2", searchset(obs(2), next_url=f"{fhir.base}/page-3"))
    fhir.answer("page-3", {"resourceType": "OperationOutcome", "issue": []}, status=503)
    records: list[dict[str, Any]] = []

    result = resolve(
        keys(conditions="Condition?patient={{context.patientId}}"), hook_request(fhir.base), on_fetch=records.append
    )

    assert ids(result.values["conditions"]) == ["o1", "o2"]
    assert result.incomplete == {"conditions"}
    assert [(r["key"], r["outcome"]) for r in records] == [("conditions", "FhirError")]


def test_a_failed_first_page_is_unavailable_not_incomplete(fhir, resolve):
    fhir.answer("Condition", {"resourceType": "OperationOutcome", "issue": []}, status=500, query_string="patient=123")

    result = resolve(
        keys(required=False, conditions="Condition?patient={{context.patientId}}"), hook_request(fhir.base)
    )

    assert result.unavailable == {"conditions"} and result.incomplete == frozenset()
    assert "conditions" not in result.values


def test_a_prefetch_key_names_its_paging_need_as_all_or_first():
    assert PrefetchKey("Condition?patient={{context.patientId}}").pages == "all"
    with pytest.raises(ValueError, match="pages"):
        PrefetchKey("Condition?patient={{context.patientId}}", pages="some")


# --- the deadline (R-10, R-14) -----------------------------------------------------------------------------------


def test_key_not_fetched_before_the_deadline_is_unavailable_when_optional(fhir, resolve):
    fhir.answer("Patient/123", PATIENT, delay=LONGER_THAN_ANY_TEST)

    result = resolve(keys(required=False, patient="Patient/{{context.patientId}}"), hook_request(fhir.base), budget=0.3)

    assert result.unavailable == {"patient"}
    assert fhir.answered == 0, "the resolver waited for the server instead of its deadline"


def test_required_key_not_fetched_before_the_deadline_is_a_412_naming_the_key(fhir, resolve):
    fhir.answer("Patient/123", PATIENT, delay=LONGER_THAN_ANY_TEST)

    with pytest.raises(PrefetchUnavailable) as info:
        resolve(keys(patient="Patient/{{context.patientId}}"), hook_request(fhir.base), budget=0.3)

    assert (info.value.status, info.value.expression) == (412, "prefetch.patient")
    assert fhir.answered == 0, "the resolver waited for the server instead of its deadline"


def test_keys_fetched_in_time_are_kept_when_another_misses_the_deadline(fhir, resolve):
    fhir.answer("Patient/123", PATIENT)
    fhir.answer("Condition", searchset(), delay=2.0, query_string="patient=123")
    templates = keys(
        required=False, patient="Patient/{{context.patientId}}", conditions="Condition?patient={{context.patientId}}"
    )

    result = resolve(templates, hook_request(fhir.base), budget=0.4)

    assert result.values == {"patient": PATIENT}
    assert result.unavailable == {"conditions"}


# --- who may be contacted (SSRF guard, tokens) --------------------------------------------------------------------


def test_fhir_server_that_is_not_allowlisted_is_never_contacted(fhir, resolve):
    fhir.answer("Patient/123", PATIENT)

    result = resolve(
        keys(required=False, patient="Patient/{{context.patientId}}"), hook_request(fhir.base), allows=deny_all
    )

    assert result.unavailable == {"patient"}
    assert fhir.requests() == []


def test_required_key_from_a_server_that_is_not_allowlisted_is_a_412(fhir, resolve):
    fhir.answer("Patient/123", PATIENT)

    with pytest.raises(PrefetchUnavailable) as info:
        resolve(keys(patient="Patient/{{context.patientId}}"), hook_request(fhir.base), allows=deny_all)

    assert (info.value.status, info.value.expression) == (412, "prefetch.patient")
    assert fhir.requests() == []


def test_required_key_without_a_fhir_server_is_a_412(resolve):
    with pytest.raises(PrefetchUnavailable) as info:
        resolve(keys(patient="Patient/{{context.patientId}}"), hook_request(None, token=None))

    assert info.value.expression == "prefetch.patient"


def test_without_a_token_the_server_is_not_contacted_unless_anonymous_is_allowed(fhir, resolve):
    fhir.answer("Patient/123", PATIENT)

    result = resolve(keys(required=False, patient="Patient/{{context.patientId}}"), hook_request(fhir.base, token=None))

    assert result.unavailable == {"patient"}
    assert fhir.requests() == []


def test_anonymous_fetch_sends_no_authorization_header(fhir, resolve):
    fhir.answer("Patient/123", PATIENT)

    result = resolve(
        keys(patient="Patient/{{context.patientId}}"), hook_request(fhir.base, token=None), allow_anonymous=True
    )

    assert result.values == {"patient": PATIENT}
    assert [r.headers.get("Authorization") for r in fhir.requests()] == [None]


def test_fetch_with_a_token_sends_it_as_a_bearer_token(fhir, resolve):
    fhir.answer("Patient/123", PATIENT)

    resolve(keys(patient="Patient/{{context.patientId}}"), hook_request(fhir.base))

    assert [r.headers.get("Authorization") for r in fhir.requests()] == [f"Bearer {TOKEN}"]


def test_fetch_asks_for_fhir_json(fhir, resolve):
    fhir.answer("Patient/123", PATIENT)

    resolve(keys(patient="Patient/{{context.patientId}}"), hook_request(fhir.base))

    assert fhir.requests()[0].headers.get("Accept") == "application/fhir+json"


# --- the audit callback -------------------------------------------------------------------------------------------


def test_on_fetch_is_called_once_per_fetch_with_key_outcome_and_latency(fhir, resolve):
    fhir.answer("Patient/123", PATIENT)
    fhir.answer("Condition", {"resourceType": "OperationOutcome", "issue": []}, status=500, query_string="patient=123")
    records: list[dict[str, Any]] = []
    templates = keys(
        required=False, patient="Patient/{{context.patientId}}", conditions="Condition?patient={{context.patientId}}"
    )

    resolve(templates, hook_request(fhir.base, prefetch={"sent": PATIENT}), on_fetch=records.append)

    assert sorted((r["key"], r["outcome"]) for r in records) == [("conditions", "FhirError"), ("patient", "ok")]
    assert all(isinstance(r["latency_ms"], float) and r["latency_ms"] >= 0 for r in records)


def test_on_fetch_is_not_called_when_nothing_is_fetched(fhir, resolve):
    records: list[dict[str, Any]] = []

    resolve(
        keys(patient="Patient/{{context.patientId}}"),
        hook_request(fhir.base, prefetch={"patient": PATIENT}),
        on_fetch=records.append,
    )

    assert records == []


def test_on_fetch_records_never_contain_the_token(fhir, resolve):
    fhir.answer("Patient/123", PATIENT)
    records: list[dict[str, Any]] = []

    resolve(keys(patient="Patient/{{context.patientId}}"), hook_request(fhir.base), on_fetch=records.append)

    assert records
    assert TOKEN not in repr(records)
