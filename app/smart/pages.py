"""The SMART app's pages: the explanation of a stored AI result (risk or job), and plain error pages.

Plain functions from data to HTML, rendered with Jinja2 templates in ``app/templates/smart/`` through a
module-level ``jinja2.Environment`` (autoescape on, StrictUndefined), so they render the same inside or outside a
Flask request. Live data comes only through ``LaunchContext.fhir_get`` (the launch's own token), and only when the
granted scopes allow it (S-6); a refused or failed FHIR call becomes a sentence on the page, never an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

from jinja2 import Environment, PackageLoader, StrictUndefined

from app.jobs import ledger
from app.logs import describe
from app.results import JOB, RISK, StoredResult

log = logging.getLogger(__name__)

# Served by Flask's own static route from app/static/smart/app.css; the CSP allows it with style-src 'self'.
STYLESHEET_URL = "/static/smart/app.css"
LOGOUT_URL = "/smart/logout"
NEWER_COUNT = 10

_env = Environment(
    loader=PackageLoader("app", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)

CATEGORY_WORDS = {
    "low": "low (under 5 %)",
    "borderline": "borderline (5 % to under 7.5 %)",
    "intermediate": "intermediate (7.5 % to under 20 %)",
    "high": "high (20 % or more)",
}
# The fallback reasons the framework gives (app.ai.reason_text), as the end of "unavailable because ...".
FALLBACK_WHY = {
    "timed out": "the model did not answer in time",
    "unavailable": "the model could not be reached",
    "overloaded": "the model was busy with other requests",
    "not applicable": "the model did not accept these inputs",
}
JOB_STATUS_WORDS = {
    ledger.QUEUED: "Waiting to start",
    ledger.RUNNING: "Being drafted now",
    ledger.SUCCEEDED: "Done: the draft is ready",
    ledger.DEAD: "Failed: the draft could not be made",
    ledger.EXPIRED: "Expired: the draft was not made in time and would no longer be clinically current",
}


@dataclass(frozen=True)
class LaunchContext:
    """What the EHR launch gave the page: the patient for the banner, the user, the granted scopes, FHIR access."""

    patient: dict | None
    need_patient_banner: bool
    user: str | None
    granted_scopes: frozenset[str]
    fhir_get: Callable[[str], dict] | None = field(default=None, repr=False)


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


def _codes(concept: Any, system: str) -> set[str]:
    codings = concept.get("coding") if isinstance(concept, dict) else None
    return {
        str(c["code"])
        for c in codings or ()
        if isinstance(c, dict) and c.get("system") == system and c.get("code") is not None
    }


def _concept_text(concept: Any) -> str:
    if not isinstance(concept, dict):
        return ""
    if isinstance(concept.get("text"), str) and concept["text"].strip():
        return concept["text"].strip()
    for coding in concept.get("coding") or ():
        if isinstance(coding, dict) and isinstance(coding.get("display"), str) and coding["display"].strip():
            return coding["display"].strip()
    return ""


def _quantity_text(quantity: Any) -> str | None:
    if not isinstance(quantity, dict) or isinstance(quantity.get("value"), bool):
        return None
    value = quantity.get("value")
    if not isinstance(value, (int, float)):
        return None
    unit = quantity.get("unit") or quantity.get("code") or ""
    number = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{quantity.get('comparator') or ''}{number} {unit}".strip()


def _observation_value(observation: dict, codes: set[str], system: str) -> str:
    """The value in words: a quantity, the matching component's quantity (systolic in a panel), or an answer."""
    shown = _quantity_text(observation.get("valueQuantity"))
    if shown:
        return shown
    for component in observation.get("component") or ():
        if isinstance(component, dict) and _codes(component.get("code"), system) & codes:
            shown = _quantity_text(component.get("valueQuantity")) or _concept_text(
                component.get("valueCodeableConcept")
            )
            if shown:
                return shown
    return _concept_text(observation.get("valueCodeableConcept")) or "no value given"


def _effective(observation: dict) -> str | None:
    period = observation.get("effectivePeriod") if isinstance(observation.get("effectivePeriod"), dict) else {}
    for value in (
        observation.get("effectiveDateTime"),
        observation.get("effectiveInstant"),
        period.get("end"),
        period.get("start"),
        observation.get("issued"),
    ):
        if isinstance(value, str) and value:
            return value
    return None


def _result_patient(result: StoredResult, context: LaunchContext) -> str | None:
    if result.patient_id:
        return result.patient_id.rsplit("/", 1)[-1]
    if isinstance(context.patient, dict) and isinstance(context.patient.get("id"), str):
        return context.patient["id"]
    return None


def _card_time(result: StoredResult) -> str:
    made_at = result.data.get("made_at") if isinstance(result.data, dict) else None
    if isinstance(made_at, str) and made_at:
        return made_at
    return result.created_at.isoformat().replace("+00:00", "Z")


def newer_values(result: StoredResult, context: LaunchContext) -> list[NewerValue]:
    """Observations for the card's inputs recorded after the card, newest first, read with the launch's token.

    Raises ScopeNotGranted when the EHR did not grant Observation search, LiveCheckFailed when the FHIR server
    could not be asked or gave no usable answer.
    """
    data = result.data if isinstance(result.data, dict) else {}
    loinc: Mapping[str, list[str]] = data.get("loinc") or {}
    system = data.get("loinc_system") or "http://loinc.org"
    codes = sorted({code for group in loinc.values() for code in group})
    patient_id = _result_patient(result, context)
    if result.kind != RISK or not codes or not patient_id:
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
            "date": f"gt{_card_time(result)}",
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
    for entry in bundle.get("entry") or ():
        observation = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(observation, dict) or observation.get("resourceType") != "Observation":
            continue
        if observation.get("status") in ("entered-in-error", "cancelled"):
            continue
        observed = _codes(observation.get("code"), system)
        for name, group in loinc.items():
            if observed & set(group):
                found.append(
                    NewerValue(
                        input=name,
                        label=labels.get(name) or name.replace("_", " "),
                        display=_observation_value(observation, set(group), system),
                        date=_effective(observation),
                        source=f"Observation/{observation.get('id', '?')}",
                    )
                )
                break
    return found


# ---- view models ------------------------------------------------------------------------------------------------


def _when(value: Any) -> str:
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


def _name(patient: dict) -> str:
    names = [n for n in patient.get("name") or () if isinstance(n, dict)]
    chosen = next((n for n in names if n.get("use") == "official"), names[0] if names else None)
    if chosen is None:
        return ""
    if isinstance(chosen.get("text"), str) and chosen["text"].strip():
        return chosen["text"].strip()
    parts = [str(p) for p in chosen.get("given") or ()] + ([str(chosen["family"])] if chosen.get("family") else [])
    return " ".join(parts)


def _banner(context: LaunchContext) -> dict[str, Any] | None:
    if not context.need_patient_banner:
        return None
    patient = context.patient if isinstance(context.patient, dict) else None
    if patient is None:
        return {"loaded": False}
    return {
        "loaded": True,
        "name": _name(patient) or "Name not recorded",
        "birth_date": patient.get("birthDate") or "not recorded",
        "gender": patient.get("gender") or "not recorded",
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


def _fallback_why(reason: Any) -> str:
    if not isinstance(reason, str) or not reason.strip():
        return "of a problem with the model"
    return FALLBACK_WHY.get(reason.strip(), f"of a problem with the model ({reason.strip()})")


def _risk_view(result: StoredResult, context: LaunchContext) -> dict[str, Any]:
    data = result.data if isinstance(result.data, dict) else {}
    checkable = any(isinstance(v, list) and v for v in (data.get("loinc") or {}).values())
    live: dict[str, Any] = {"status": "checked" if checkable else "skipped", "message": "", "found": []}
    try:
        live["found"] = newer_values(result, context)
    except LiveCheckUnavailable as exc:
        live = {"status": "unavailable", "message": exc.message, "found": []}
    newer: dict[str, list[NewerValue]] = {}
    for value in live["found"]:
        newer.setdefault(value.input, []).append(value)
    inputs = []
    for item in data.get("inputs") or ():
        if isinstance(item, dict):
            inputs.append({**item, "when": _when(item.get("date")), "newer": newer.pop(item.get("name"), [])})
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    guideline = data.get("guideline") if isinstance(data.get("guideline"), dict) else {}
    estimator = data.get("estimator") if isinstance(data.get("estimator"), dict) else {}
    statin = data.get("statin") if isinstance(data.get("statin"), dict) else {}
    return {
        "risk_text": data.get("risk_text"),
        "category": CATEGORY_WORDS.get(data.get("category"), data.get("category")),
        "made_at": _when(_card_time(result)),
        "record_read": data.get("record_read", True),
        "fallback": bool(data.get("fallback")),
        "fallback_why": _fallback_why(data.get("fallback_reason")),
        "inputs": inputs,
        "missing": [m for m in data.get("missing") or () if isinstance(m, dict)],
        "notes": [str(n) for n in data.get("notes") or ()],
        "statin_status": statin.get("status"),
        "statins": [{**s, "when": _when(s.get("date"))} for s in statin.get("items") or () if isinstance(s, dict)],
        "ascvd": [{**c, "when": _when(c.get("date"))} for c in data.get("ascvd") or () if isinstance(c, dict)],
        "model_name": model.get("name") or "unknown",
        "model_version": model.get("version"),
        "model_equation": model.get("equation"),
        "model_notes": [str(n) for n in model.get("notes") or ()],
        "guideline_label": guideline.get("label") or "ACC/AHA Pooled Cohort Equations 2013",
        "guideline_url": guideline.get("url") or "",
        "estimator_label": estimator.get("label") or "",
        "estimator_url": estimator.get("url") or "",
        "live": live,
        "newer_other": [v for values in newer.values() for v in values],  # inputs the card did not list
    }


def _job_view(job: ledger.Job | None) -> dict[str, Any]:
    if job is None:
        return {"found": False}
    outcome = job.result if isinstance(job.result, dict) else {}
    model = outcome.get("model") if isinstance(outcome.get("model"), dict) else {}
    status = JOB_STATUS_WORDS.get(job.state, job.state)
    if job.state == ledger.QUEUED and job.attempts:
        status = f"Waiting to try again (attempt {job.attempts} of {job.max_attempts} did not succeed)"
    return {
        "found": True,
        "state": job.state,
        "status": status,
        "succeeded": job.state == ledger.SUCCEEDED,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "created": _when(job.created_at),
        "updated": _when(job.updated_at),
        "expires": _when(job.expires_at) if job.expires_at else "",
        "summary": outcome.get("summary") if isinstance(outcome.get("summary"), str) else "",
        "document": outcome.get("documentReference") or "",
        "doc_status": outcome.get("docStatus") or "preliminary",
        "model_name": model.get("name") or "",
        "model_version": model.get("version") or "",
    }


# ---- rendering --------------------------------------------------------------------------------------------------


def render_result(
    result: StoredResult, context: LaunchContext, *, job: ledger.Job | None = None, csrf_token: str = ""
) -> str:
    """The explanation page for a stored result: a risk card's reasoning, or a job's status and draft."""
    if result.kind == RISK:
        page = _page("Cardiovascular risk: how this estimate was made", context, csrf_token)
        return _env.get_template("smart/result_risk.html").render(**page, risk=_risk_view(result, context))
    if result.kind == JOB:
        page = _page("Discharge summary draft", context, csrf_token)
        return _env.get_template("smart/result_job.html").render(**page, job=_job_view(job))
    page = _page("Result cannot be shown", context, csrf_token)
    message = "This kind of result cannot be shown by this version of the app."
    return _env.get_template("smart/error.html").render(**page, message=message)


def render_error(title: str, message: str) -> str:
    """A plain error page (denied or expired launch, unknown result, signed out) with no patient data."""
    return _env.get_template("smart/error.html").render(**_page(title, None, ""), message=message)
