"""The SMART app's pages: the explanation of a stored AI result, and plain error pages.

A result's ``kind`` names the declared service that made it; the service's ``Explanation`` gives the page title,
its template and the view that turns the stored data into the template's variables. This module only frames the
page (banner, title, sign-out form) and knows no service. Templates are Jinja2 (``app/templates/smart/`` and the
``templates/`` folder next to a service's module), rendered through module-level environments (autoescape on,
StrictUndefined), so pages render the same inside or outside a Flask request. Live data comes only through
``LaunchContext.fhir_get`` (the launch's own token), and only when the granted scopes allow it (S-6); a refused or
failed FHIR call becomes a sentence on the page, never an error. A service's view starts from ``result_view``,
which reads the layout ``app.cds.inputs`` stores (inputs with values recorded since the card, what was missing, the
model, the fallback's reason in words), and adds its own parts.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

from jinja2 import BaseLoader, ChoiceLoader, Environment, FileSystemLoader, PackageLoader, StrictUndefined

from app.cds.service import get_service
from app.fhir.codes import codes_in
from app.fhir.compartment import Compartment
from app.fhir.record import concept_text, effective_text, quantity_text, usable_observation
from app.logs import describe
from app.results import StoredResult

log = logging.getLogger(__name__)

# Served by Flask's own static route from app/static/smart/app.css; the CSP allows it with style-src 'self'.
STYLESHEET_URL = "/static/smart/app.css"
LOGOUT_URL = "/smart/logout"
NEWER_COUNT = 10


@functools.cache
def _environment(*service_folders: str) -> Environment:
    """The templates of the app, then those in the given service folders (one environment per folder set)."""
    loaders: list[BaseLoader] = [PackageLoader("app", "templates"), *(FileSystemLoader(f) for f in service_folders)]
    return Environment(
        loader=ChoiceLoader(loaders),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


@dataclass(frozen=True)
class LaunchContext:
    """What the EHR launch gave the page: the patient for the banner, the user, the granted scopes, FHIR access."""

    patient: dict | None
    need_patient_banner: bool
    user: str | None
    granted_scopes: frozenset[str]
    fhir_get: Callable[[str], dict] | None = field(default=None, repr=False)
    fhir_server: str | None = None  # the launch's iss: where the live data's references resolve


@dataclass(frozen=True)
class NewerValue:
    """An observation recorded after the card was made, for one of the card's inputs."""

    input: str
    label: str
    display: str
    date: str | None
    source: str


class LiveCheckUnavailable(Exception):
    """Newer values could not be looked for; the message says why, in words for the clinician."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ScopeNotGranted(LiveCheckUnavailable):
    pass


class LiveCheckFailed(LiveCheckUnavailable):
    pass


# ---- scopes ----------------------------------------------------------------------------------------------------

_V1_ACCESS = {"read": "rs", "write": "cud", "*": "cruds"}
_WORDS = {"read": "r", "search": "s", "create": "c", "update": "u", "delete": "d", "write": "cud"}


def _letters(access: str) -> set[str] | None:
    """The v2 letters a scope's access part grants (``read`` = ``rs``, S-8), or None when it is not a scope."""
    if access in _V1_ACCESS:
        return set(_V1_ACCESS[access])
    if access and set(access) <= set("cruds"):
        return set(access)
    return None


def allows(
    scopes: Iterable[str], resource_type: str, access: str, *, levels: tuple[str, ...] = ("patient", "user")
) -> bool:
    """Whether ``scopes`` grant ``access`` on ``resource_type``, in SMART v1 (``.read``, ``.write``, ``.*``) or v2
    (``.rs``, ``.r``, ...) form, for a patient or user scope, by name or ``*``.

    ``access`` is a word (``read`` = r, ``search`` = s, ``write`` = cud, ``create``, ``update``, ``delete``) or
    v2 letters (``rs``). A v2 scope narrowed by a query (``patient/Observation.rs?category=laboratory``) still
    counts: the FHIR server applies the narrowing.
    """
    wanted = set(_WORDS.get(access, access))
    if not wanted or not wanted <= set("cruds"):
        raise ValueError(f"unknown access {access!r}")
    for scope in scopes:
        level, _, rest = scope.partition("/")
        resource, _, granted = rest.split("?", 1)[0].partition(".")
        if level not in levels or resource not in (resource_type, "*"):
            continue
        letters = _letters(granted)
        if letters is not None and wanted <= letters:
            return True
    return False


# ---- newer values -----------------------------------------------------------------------------------------------


def _observation_value(observation: dict, codes: set[str], system: str) -> str:
    """The value in words: a quantity, the matching component's quantity (systolic in a panel), or an answer."""
    shown = quantity_text(observation.get("valueQuantity"))
    if shown:
        return shown
    for component in _list(observation.get("component")):
        if isinstance(component, dict) and codes_in(component.get("code"), system) & codes:
            shown = quantity_text(component.get("valueQuantity")) or concept_text(component.get("valueCodeableConcept"))
            if shown:
                return shown
    return concept_text(observation.get("valueCodeableConcept")) or "no value given"


def _result_patient(result: StoredResult, context: LaunchContext) -> str | None:
    if result.patient_id:
        return result.patient_id.rsplit("/", 1)[-1]
    if isinstance(context.patient, dict) and isinstance(context.patient.get("id"), str):
        return context.patient["id"]
    return None


def card_time(result: StoredResult) -> str:
    """When the card was made: the stored ``made_at``, else when the result was stored."""
    made_at = result.data.get("made_at") if isinstance(result.data, dict) else None
    if isinstance(made_at, str) and made_at:
        return made_at
    return result.created_at.isoformat().replace("+00:00", "Z")


def newer_values(result: StoredResult, context: LaunchContext) -> list[NewerValue]:
    """Observations for the card's inputs recorded after the card, newest first, read with the launch's token.

    For any result whose data lists, by input name, the codes that carry it (``loinc``, in ``loinc_system``,
    default LOINC) and the inputs' labels (``inputs``: ``name`` and ``label``); [] for one that lists none.
    Raises ScopeNotGranted when the EHR did not grant Observation search, LiveCheckFailed when the FHIR server
    could not be asked or gave no usable answer.
    """
    data = result.data if isinstance(result.data, dict) else {}
    loinc: Mapping[str, list[str]] = data.get("loinc") or {}
    system = data.get("loinc_system") or "http://loinc.org"
    codes = sorted({code for group in loinc.values() for code in group})
    patient_id = _result_patient(result, context)
    if not codes or not patient_id:
        return []
    if not allows(context.granted_scopes, "Observation", "search"):
        raise ScopeNotGranted(
            "Newer values could not be checked: the EHR did not grant this app access to the patient's observations."
        )
    if context.fhir_get is None:
        raise LiveCheckFailed("Newer values could not be checked: no connection to the EHR's FHIR server.")
    query = urlencode(
        {
            "patient": patient_id,
            "code": ",".join(f"{system}|{code}" for code in codes),
            "date": f"gt{card_time(result)}",
            "_sort": "-date",
            "_count": str(NEWER_COUNT),
        },
        safe=",|:",
        quote_via=quote,
    )
    try:
        bundle = context.fhir_get(f"Observation?{query}")
    except Exception as exc:  # any failure of the EHR's server is a sentence on the page, never a 500
        log.warning("newer values check failed: %s", describe(exc))
        raise LiveCheckFailed("Newer values could not be checked: the EHR's FHIR server did not answer.") from None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise LiveCheckFailed("Newer values could not be checked: the EHR's FHIR server gave an unexpected answer.")
    labels = {item.get("name"): item.get("label") for item in data.get("inputs") or () if isinstance(item, dict)}
    found = []
    compartment = Compartment(patient_id, context.fhir_server)
    for entry in _list(bundle.get("entry")):
        observation = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(observation, dict) or observation.get("resourceType") != "Observation":
            continue
        if not usable_observation(observation) or not compartment.holds(observation):
            continue  # another patient's (or another server's) observation is never shown
        observed = codes_in(observation.get("code"), system)
        for name, group in loinc.items():
            if observed & set(group):
                found.append(
                    NewerValue(
                        input=name,
                        label=labels.get(name) or name.replace("_", " "),
                        display=_observation_value(observation, set(group), system),
                        date=effective_text(observation),
                        source=f"Observation/{_text(observation.get('id')) or '?'}",
                    )
                )
                break
    return found


# ---- view models ------------------------------------------------------------------------------------------------


def when(value: Any) -> str:
    """A FHIR date or instant, readable: ``2026-11-01 09:00 UTC`` or ``2026-11-01``."""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M UTC")
    if not isinstance(value, str) or not value:
        return ""
    if "T" not in value:
        return value
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    offset = moment.strftime("%z")
    zone = "UTC" if offset in ("+0000", "") else f"UTC{offset[:3]}:{offset[3:]}"
    return f"{moment:%Y-%m-%d %H:%M} {zone}"


def dated(items: Any) -> list[dict[str, Any]]:
    """The dicts of a stored list, each with ``when``: its ``date`` made readable (see ``when``)."""
    return [{**item, "when": when(item.get("date"))} for item in items or () if isinstance(item, dict)]


def section(data: Any, name: str) -> dict[str, Any]:
    """A dict member of stored data (``model``, ``guideline``...), {} when absent or not a dict."""
    value = data.get(name) if isinstance(data, dict) else None
    return value if isinstance(value, dict) else {}


# The fallback reasons the framework gives (app.ai.reason_text), as the end of "unavailable because ...".
FALLBACK_WHY = {
    "timed out": "the model did not answer in time",
    "unavailable": "the model could not be reached",
    "overloaded": "the model was busy with other requests",
    "not applicable": "the model did not accept these inputs",
}


def fallback_why(reason: Any) -> str:
    """Why a fallback card was given, to end "The AI result was unavailable because ...", from its stored reason."""
    if not isinstance(reason, str) or not reason.strip():
        return "of a problem with the model"
    return FALLBACK_WHY.get(reason.strip(), f"of a problem with the model ({reason.strip()})")


def live_check(result: StoredResult, context: LaunchContext) -> dict[str, Any]:
    """Values recorded since the card (``newer_values``, with the launch's token) as ``found``, and ``status``:
    ``checked``, ``skipped`` (the result lists no codes to look for) or ``unavailable`` (``message`` says why)."""
    data = result.data if isinstance(result.data, dict) else {}
    checkable = any(isinstance(v, list) and v for v in (data.get("loinc") or {}).values())
    try:
        return {"status": "checked" if checkable else "skipped", "message": "", "found": newer_values(result, context)}
    except LiveCheckUnavailable as exc:
        return {"status": "unavailable", "message": exc.message, "found": []}


def result_view(result: StoredResult, context: LaunchContext) -> dict[str, Any]:
    """What any explanation page of a result stored in the common layout shows (see ``app.cds.inputs``).

    ``made_at`` (readable), ``record_read``, ``fallback`` and ``fallback_why``; the stored ``inputs``, dated, each
    with the values recorded since the card (``newer``); ``missing`` and ``notes``; the ``live`` check itself (see
    ``live_check``) and ``newer_other``, newer values for inputs the card did not list; and the model's
    ``model_name``, ``model_version`` and ``model_notes``. A service adds its own parts to these.
    """
    data = result.data if isinstance(result.data, dict) else {}
    live = live_check(result, context)
    newer: dict[str, list[NewerValue]] = {}
    for value in live["found"]:
        newer.setdefault(value.input, []).append(value)
    inputs = [{**item, "newer": newer.pop(item.get("name"), [])} for item in dated(data.get("inputs"))]
    model = section(data, "model")
    return {
        "made_at": when(card_time(result)),
        "record_read": data.get("record_read", True),
        "fallback": bool(data.get("fallback")),
        "fallback_why": fallback_why(data.get("fallback_reason")),
        "inputs": inputs,
        "missing": [m for m in data.get("missing") or () if isinstance(m, dict)],
        "notes": [str(n) for n in data.get("notes") or ()],
        "live": live,
        "newer_other": [v for values in newer.values() for v in values],
        "model_name": model.get("name") or "unknown",
        "model_version": model.get("version"),
        "model_notes": [str(n) for n in model.get("notes") or ()],
    }


def _list(value: Any) -> list:
    """A FHIR array member; anything else the EHR sent in its place counts as none."""
    return value if isinstance(value, list) else []


def _text(value: Any) -> str:
    """A FHIR string member, stripped; anything else counts as not recorded."""
    return value.strip() if isinstance(value, str) else ""


def _name(patient: dict) -> str:
    names = [n for n in _list(patient.get("name")) if isinstance(n, dict)]
    chosen = next((n for n in names if n.get("use") == "official"), names[0] if names else None)
    if chosen is None:
        return ""
    if _text(chosen.get("text")):
        return _text(chosen["text"])
    parts = [_text(p) for p in [*_list(chosen.get("given")), chosen.get("family")]]
    return " ".join(p for p in parts if p)


def _banner(context: LaunchContext) -> dict[str, Any] | None:
    if not context.need_patient_banner:
        return None
    patient = context.patient if isinstance(context.patient, dict) else None
    if patient is None:
        return {"loaded": False}
    return {
        "loaded": True,
        "name": _name(patient) or "Name not recorded",
        "birth_date": _text(patient.get("birthDate")) or "not recorded",
        "gender": _text(patient.get("gender")) or "not recorded",
    }


def _page(title: str, context: LaunchContext | None, csrf_token: str) -> dict[str, Any]:
    return {
        "title": title,
        "stylesheet": STYLESHEET_URL,
        "banner": _banner(context) if context is not None else None,
        "user": context.user if context is not None else None,
        "csrf_token": csrf_token,
        "logout_url": LOGOUT_URL if csrf_token else None,
    }


# ---- rendering --------------------------------------------------------------------------------------------------


def render_result(result: StoredResult, context: LaunchContext, *, csrf_token: str = "") -> str:
    """The explanation page of a stored result: the template and view its service declared, in the common frame."""
    service = get_service(result.kind)
    explanation = service.explanation if service is not None else None
    if explanation is None:
        page = _page("Result cannot be shown", context, csrf_token)
        message = "This kind of result cannot be shown by this version of the app."
        return _environment().get_template("smart/error.html").render(**page, message=message)
    folders = (explanation.template_folder,) if explanation.template_folder else ()
    template = _environment(*folders).get_template(explanation.template)
    return template.render(**_page(explanation.title, context, csrf_token), **explanation.view(result, context))


def render_error(title: str, message: str) -> str:
    """A plain error page (denied or expired launch, unknown result, signed out) with no patient data."""
    return _environment().get_template("smart/error.html").render(**_page(title, None, ""), message=message)
