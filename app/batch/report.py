"""The report of a population run: one self-contained HTML page (inline CSS, an SVG chart drawn here, no script).

Operators and clinical leads open it from ``BATCH_DIR/RUN/report.html`` or ``GET /admin/batch/{run}/report``. It
shows counts only, never patient data, so it may go to people who may not see PHI: the page is built from the
fields below and nothing else in the summary is ever rendered (a stray list of patient ids stays out), and the
export's error strings are shown with FHIR references and UUIDs removed.

The summary is plain JSON kept by the run, with the camelCase keys of the run's other JSON (``manifest.json``,
``Run.parameters()``, the parts' ``summary.json``). Every field except ``run`` may be missing or null: the page
then says "not recorded", or derives the figure as noted, and never fails::

    {
      "version": 1,
      "run": "run-8c0e6a3e5b1d2f40",                        # run id
      "service": {"id": "cardiovascular-risk", "title": "10-year ASCVD risk (Pooled Cohort Equations)"},
      "state": "exporting" | "splitting" | "scoring" | "finishing" | "succeeded" | "failed" | "cancelled",
      "created": "2026-03-01T09:00:00+00:00",               # ISO 8601 instants; naive means UTC
      "started": "2026-03-01T09:00:02+00:00",
      "finished": "2026-03-01T09:04:10+00:00",              # null until the run ends
      "updated": "2026-03-01T09:04:10+00:00",               # when this summary was made: the "as of" of the
                                                            # partial counts of a run in progress
      "parameters": {"fhirServer": "https://ehr.example.org/fhir", "group": "clinic-a" | null,
                     "since": ISO 8601 | null, "writeBack": false,
                     "client": "https://ehr.example.org"},  # Run.parameters(); its "service" is not shown
      "transactionTime": "2026-03-01T09:00:05+00:00",       # the export's transactionTime
      "parts": {"done": 12, "total": 40},                   # scoring parts checkpointed so far
      "counts": {"patients": 1000,                          # patients found in the export (scored + not)
                 "scored": 950,                             # default: the sum of byCategory
                 "notScored": 50,                           # default: the sum of notScoredReasons
                 "badLines": 2,                             # NDJSON lines that could not be read
                 "dropped": 3,                              # resources of no patient of the export (another
                                                            # server's, a bare id, urn:uuid...): left out
                 "worklist": 310,                           # rows of worklist.csv
                 "writtenBack": 0},                         # RiskAssessments written to the EHR
      "byCategory": {"low": 500, "borderline": 100, "intermediate": 250, "high": 100},
      "notScoredReasons": {"missing-hdl": 30, "age-out-of-range": 20},     # reason code: patients
      "reasonLabels": {"missing-hdl": "No HDL cholesterol result"},        # Population.reasons (else the code)
      "histogram": [{"low": 0.0, "high": 0.01, "count": 80}, ..., {"low": 0.3, "high": null, "count": 40}],
      "durations": {"export": 31.2, "split": 0.8, "score": 212.5, "total": 248.0},   # seconds; total defaults
                                                            # to finished - started
      "throughput": 4.03,                                   # patients seen per second of the total duration
                                                            # (default: patients / durations.total)
      "files": [{"name": "RiskAssessment.ndjson", "lines": 950, "sha256": "9f86d0..."}],
      "errors": ["Observation: server error 500"]           # short strings from the export's error files
    }

Histogram bins hold 10-year risk as a fraction, ``low`` inclusive and ``high`` exclusive; ``high: null`` is the
open last bin. ``bins_from_counts`` turns the parts' list of counts per 1 % step into these bins. A bar takes the
colour of the category of its lower edge; a bin that straddles a threshold (7 % to 8 % straddles 7.5 %) says so
in its text, and the exact counts per category are in the table above the chart.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup, escape

from app.ai.models.pce import BORDERLINE, HIGH, INTERMEDIATE, LOW, risk_category
from app.batch.runs import ACTIVE, CANCELLED, ENDED, EXPORTING, FAILED, FINISHING, SCORING, SPLITTING, SUCCEEDED

SUMMARY_VERSION = 1
STATE_TEXT = {
    EXPORTING: "in progress: exporting",
    SPLITTING: "in progress: splitting the export into parts",
    SCORING: "in progress: scoring",
    FINISHING: "in progress: writing the results",
    SUCCEEDED: "succeeded",
    FAILED: "failed",
    CANCELLED: "cancelled",
}

CATEGORIES = (LOW, BORDERLINE, INTERMEDIATE, HIGH)
CATEGORY_NAMES = {LOW: "Low", BORDERLINE: "Borderline", INTERMEDIATE: "Intermediate", HIGH: "High"}
CATEGORY_RANGES = {
    LOW: "under 5 %",
    BORDERLINE: "5 % to under 7.5 %",
    INTERMEDIATE: "7.5 % to under 20 %",
    HIGH: "20 % or more",
}
CATEGORY_SHORT_RANGES = {LOW: "<5 %", BORDERLINE: "5–<7.5 %", INTERMEDIATE: "7.5–<20 %", HIGH: "≥20 %"}
# Okabe-Ito colours: neighbouring categories differ in hue and lightness, so they stay apart for colour-blind readers
# and in grey print; the legend and tables name every category in words as well.
PALETTE = {LOW: "#0072B2", BORDERLINE: "#56B4E9", INTERMEDIATE: "#E69F00", HIGH: "#D55E00"}
THRESHOLDS = (0.05, 0.075, 0.20)

MAX_ERRORS_SHOWN = 20
MAX_TEXT = 300
_REFERENCE = re.compile(r"\b([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}")
_UUID = re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b")
_STYLE = re.compile(r"<style>(.*?)</style>", re.DOTALL)

SVG_TITLE_ID, SVG_DESC_ID = "risk-histogram-title", "risk-histogram-desc"
INK, AXIS, GRID, OTHER = "#1a1a1a", "#555555", "#dddddd", "#999999"
LEGEND_CHAR_WIDTH = 6.2  # an 11 px sans-serif character, near enough to lay the legend out without measuring text


# ---- histogram bins ------------------------------------------------------------------------------------------


def bins_from_counts(counts: list[int], step: float = 0.01) -> list[dict[str, Any]]:
    """The summary's bins from counts per ``step`` of risk, the last count being everything above (the parts'
    ``histogram``: 1 % steps, then 30 % or more)."""
    bins = [{"low": round(i * step, 6), "high": round((i + 1) * step, 6), "count": n} for i, n in enumerate(counts)]
    if bins:
        bins[-1]["high"] = None
    return bins


# ---- the page -------------------------------------------------------------------------------------------------


@functools.cache
def _environment() -> Environment:
    """Autoescaped templates that render the same from the CLI, a job worker or a request."""
    return Environment(
        loader=PackageLoader("app", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_report(summary: dict) -> str:
    """The whole HTML document for a run's summary (shape in the module docstring)."""
    return (
        _environment()
        .get_template("batch/report.html")
        .render(**_view(summary if isinstance(summary, Mapping) else {}))
    )


def content_security_policy(html: str) -> str:
    """A Content-Security-Policy for serving a rendered report: its one inline stylesheet by hash, nothing else.

    Computed from the document served (a report written by an older release may carry other CSS).
    """
    hashes = [base64.b64encode(hashlib.sha256(css.encode()).digest()).decode() for css in _STYLE.findall(html)]
    styles = " ".join(f"'sha256-{h}'" for h in hashes) or "'none'"
    return f"default-src 'none'; style-src {styles}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"


def _view(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the template shows, already formatted: the template never reads the summary itself."""
    service = _mapping(summary.get("service"))
    state = _text(summary.get("state"))
    parts = _mapping(summary.get("parts"))
    parts_done, parts_total = _count(parts.get("done")), _count(parts.get("total"))
    bins = summary.get("histogram")
    has_chart = isinstance(bins, list) and bool(bins)
    errors = [e for e in _list(summary.get("errors")) if isinstance(e, str) and e.strip()]
    patients = _count(_mapping(summary.get("counts")).get("patients"))
    return {
        "run": _text(summary.get("run")) or "unknown run",
        "service_id": _text(service.get("id")),
        "service_title": _text(service.get("title")),
        "state": state,
        "state_text": STATE_TEXT.get(state or "", state or "not recorded"),
        "in_progress": state in ACTIVE,
        "stopped_early": state in (FAILED, CANCELLED),
        "state_unknown": state not in ENDED and state not in ACTIVE,
        "no_patients": state == SUCCEEDED and patients == 0,
        "as_of": _instant_text(summary.get("updated")),
        "parts": f"{_int_text(parts_done)} of {_int_text(parts_total)}" if parts_done is not None else None,
        "times": [
            ("Created", _instant_text(summary.get("created"))),
            ("Started", _instant_text(summary.get("started"))),
            ("Finished", _instant_text(summary.get("finished")) or ("not yet" if state in ACTIVE else None)),
            ("Export transaction time", _instant_text(summary.get("transactionTime"))),
        ],
        "parameters": _parameter_rows(_mapping(summary.get("parameters"))),
        **_count_rows(summary),
        "chart": risk_histogram_svg(bins) if has_chart else None,
        "bins": _bin_rows(bins) if has_chart else [],
        **_time_rows(summary, patients),
        "files": [
            {
                "name": _text(f.get("name")) or "unnamed",
                "lines": _int_text(_count(f.get("lines"))),
                "sha256": _text(f.get("sha256")),
            }
            for f in _list(summary.get("files"))
            if isinstance(f, Mapping)
        ],
        "errors": [_without_ids(e) for e in errors[:MAX_ERRORS_SHOWN]],
        "errors_more": max(0, len(errors) - MAX_ERRORS_SHOWN),
    }


def _parameter_rows(parameters: Mapping[str, Any]) -> list[tuple[str, str | None]]:
    """What the run was asked to do (``Run.parameters()``)."""
    return [
        ("FHIR server", _text(parameters.get("fhirServer"))),
        ("Client", _text(parameters.get("client"))),
        ("Group", _text(parameters.get("group")) or "none: every patient the server exports"),
        ("Changed since", _instant_text(parameters.get("since")) or "any time (full export)"),
        ("Write-back", _yes_no(parameters.get("writeBack"))),
    ]


def _count_rows(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The patients table, the categories table and the reasons table, with their shares."""
    counts = _mapping(summary.get("counts"))
    by_category = _mapping(summary.get("byCategory"))
    category_keys = [*CATEGORIES, *(str(k) for k in by_category if k not in CATEGORIES)]
    category_counts = {c: _count(by_category.get(c)) for c in category_keys}
    reason_counts = {str(code): _count(n) for code, n in _mapping(summary.get("notScoredReasons")).items()}
    labels = _mapping(summary.get("reasonLabels"))
    patients = _count(counts.get("patients"))
    scored = _count(counts.get("scored"))
    if scored is None and any(n is not None for n in category_counts.values()):
        scored = sum(n or 0 for n in category_counts.values())
    not_scored = _count(counts.get("notScored"))
    if not_scored is None and reason_counts:
        not_scored = sum(n or 0 for n in reason_counts.values())
    write_back = _mapping(summary.get("parameters")).get("writeBack")
    return {
        "counts": [
            ("Patients seen", _int_text(patients), "patients found in the export"),
            ("Scored", _int_text(scored), _share(scored, patients, "of patients seen")),
            ("Not scored", _int_text(not_scored), _share(not_scored, patients, "of patients seen")),
            (
                "Unreadable input lines",
                _int_text(_count(counts.get("badLines"))),
                "NDJSON lines that could not be read",
            ),
            (
                "Resources left out",
                _int_text(_count(counts.get("dropped"))),
                "resources of no patient of this export (another server's, or a patient named by a bare id or "
                "urn:uuid): not scored",
            ),
            ("On the worklist", _int_text(_count(counts.get("worklist"))), "patients for whom an action is proposed"),
            (
                "Written back",
                _int_text(_count(counts.get("writtenBack"))) if write_back is not False else "off",
                "RiskAssessments written to the EHR" if write_back is not False else "write-back was not asked for",
            ),
        ],
        "categories": [
            {
                "name": CATEGORY_NAMES.get(c) or _text(c) or "unnamed",
                "range": CATEGORY_RANGES.get(c, ""),
                "colour": PALETTE.get(c, OTHER),
                "count": _int_text(category_counts[c]),
                "share": _share(category_counts[c], scored),
            }
            for c in category_keys
        ],
        "reasons": [
            {
                "label": _text(labels.get(code)) or _text(code) or "unnamed",
                "code": _text(code),
                "count": _int_text(n),
                "share": _share(n, not_scored),
            }
            for code, n in sorted(reason_counts.items(), key=lambda item: (-(item[1] or 0), item[0]))
        ],
    }


def _time_rows(summary: Mapping[str, Any], patients: int | None) -> dict[str, Any]:
    """Durations by stage and throughput; the total and the throughput derived when the summary lacks them."""
    durations = _mapping(summary.get("durations"))
    total = _number(durations.get("total"))
    started, finished = _instant(summary.get("started")), _instant(summary.get("finished"))
    if total is None and started and finished and finished >= started:
        total = (finished - started).total_seconds()
    throughput = _number(summary.get("throughput"))
    if throughput is None and patients is not None and total:
        throughput = patients / total
    return {
        "durations": [
            ("Export", _duration_text(_number(durations.get("export")))),
            ("Split into parts", _duration_text(_number(durations.get("split")))),
            ("Scoring", _duration_text(_number(durations.get("score")))),
            ("Total", _duration_text(total)),
        ],
        "throughput": _rate_text(throughput),
    }


def _bin_rows(bins: list[Any]) -> list[dict[str, str]]:
    """The histogram as table rows, the text alternative to the chart."""
    return [
        {"range": _bin_range(b.low, b.high), "count": _int_text(b.count), "category": _categories_text(b)}
        for b in _clean_bins(bins)
    ]


# ---- the chart ------------------------------------------------------------------------------------------------


class _Bin:
    """A checked histogram bin: fractions, ``high`` None for the open last bin, the category of its lower edge."""

    __slots__ = ("low", "high", "count", "category", "also")

    def __init__(self, low: float, high: float | None, count: int):
        self.low, self.high, self.count = low, high, count
        self.category = risk_category(low)
        # The categories of the thresholds inside the bin: its patients may be in any of them.
        self.also = [risk_category(t) for t in THRESHOLDS if low < t and (high is None or t < high)]


def _categories_text(b: _Bin) -> str:
    """The bin's category in words, or each category it may hold when it straddles a threshold."""
    names = [CATEGORY_NAMES[c] for c in (b.category, *b.also)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1].lower()


def _clean_bins(bins: Iterable[Any]) -> list[_Bin]:
    """The usable bins, by lower edge; a bin with a missing or impossible edge or count is left out."""
    clean = []
    for raw in bins if isinstance(bins, list) else []:
        if not isinstance(raw, Mapping):
            continue
        low, high, count = _number(raw.get("low")), _number(raw.get("high")), _count(raw.get("count"))
        if low is None or count is None or low < 0 or (raw.get("high") is not None and (high is None or high <= low)):
            continue
        clean.append(_Bin(low, high, count))
    return sorted(clean, key=lambda b: (b.low, b.high is None))


def risk_histogram_svg(bins: list[dict], *, width: int = 640, height: int = 240) -> str:
    """An inline SVG bar chart of scored patients by 10-year risk, coloured by category, thresholds marked.

    Bars are to scale on a linear risk axis; the open last bin (``high`` null) stands apart after a gap. The
    title, description and each bar's tooltip carry the same figures as text.
    """
    clean = _clean_bins(bins)
    finite = [b for b in clean if b.high is not None]
    open_bins = [b for b in clean if b.high is None]
    opened = _Bin(min(b.low for b in open_bins), None, sum(b.count for b in open_bins)) if open_bins else None

    left, right, bottom = 52, 12, 40
    legend, legend_bottom = _legend(left, width - right)
    top = legend_bottom + 25  # room for the thresholds' labels
    plot_w, plot_h = max(width - left - right, 40), max(height - top - bottom, 20)
    x0 = min((b.low for b in finite), default=0.0)
    x1 = max((b.high for b in finite if b.high is not None), default=opened.low if opened else 0.30)
    if x1 <= x0:
        x1 = x0 + 0.01
    typical = sorted(b.high - b.low for b in finite if b.high is not None)
    gap = 10.0 if opened else 0.0
    slot = min(plot_w / 4, 3 * plot_w * (typical[len(typical) // 2] if typical else 0.01) / (x1 - x0)) if opened else 0
    span_w = plot_w - gap - slot
    base = top + plot_h

    def x(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * span_w

    shown = [*finite, *([opened] if opened else [])]
    peak = max((b.count for b in shown), default=0)
    step = _nice_step(peak / 5) if peak else 1
    y_max = max(step, math.ceil(peak / step) * step)
    total = sum(b.count for b in shown)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-labelledby="{SVG_TITLE_ID} {SVG_DESC_ID}" class="histogram" '
        f'font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif" font-size="11" fill="{INK}">',
        f'<title id="{SVG_TITLE_ID}">Scored patients by 10-year ASCVD risk</title>',
        f'<desc id="{SVG_DESC_ID}">{escape(_describe(finite, opened, x0, x1, total))}</desc>',
    ]
    out += legend
    for i in range(0, y_max + 1, step):
        y = base - i / y_max * plot_h
        out.append(f'<line x1="{left}" y1="{y:.2f}" x2="{left + plot_w}" y2="{y:.2f}" stroke="{GRID}"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.2f}" text-anchor="end">{i:,}</text>')
    out.append(
        f'<text transform="translate(14 {top + plot_h / 2:.2f}) rotate(-90)" text-anchor="middle">Patients</text>'
    )
    for b in shown:
        if b.count <= 0:
            continue
        if b.high is None:
            bx, bw = left + span_w + gap, slot
        else:
            bx, bw = x(b.low), x(b.high) - x(b.low)
        inset = min(0.5, bw / 4)
        bar_h = b.count / y_max * plot_h
        out.append(
            f'<rect class="bar" data-count="{b.count}" data-category="{b.category}" x="{bx + inset:.2f}" '
            f'y="{base - bar_h:.2f}" width="{max(bw - 2 * inset, 0.5):.2f}" height="{bar_h:.2f}" '
            f'fill="{PALETTE[b.category]}"><title>{escape(_bin_range(b.low, b.high))}: '
            f"{_patients(b.count)} ({escape(_categories_text(b).lower())})</title></rect>"
        )
    out.append(f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="{AXIS}"/>')
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" stroke="{AXIS}"/>')
    out += _x_ticks(x, x0, x1, base)
    if opened:
        centre = left + span_w + gap + slot / 2
        out.append(f'<text x="{centre:.2f}" y="{base + 14}" text-anchor="middle">≥{_percent(opened.low)}</text>')
    for t in THRESHOLDS:
        if x0 < t < x1 or (t == x1 and opened):
            tx = x(t)
            out.append(
                f'<line class="threshold" data-risk="{t}" x1="{tx:.2f}" y1="{top - 4}" x2="{tx:.2f}" y2="{base}" '
                f'stroke="{INK}" stroke-width="1" stroke-dasharray="4 3"/>'
            )
            out.append(f'<text x="{tx:.2f}" y="{top - 8}" text-anchor="middle">{_percent(t)}</text>')
    if total == 0:
        out.append(
            f'<text x="{left + plot_w / 2:.2f}" y="{top + plot_h / 2:.2f}" text-anchor="middle" font-size="13">'
            "No scored patients</text>"
        )
    out.append(f'<text x="{left + plot_w / 2:.2f}" y="{height - 6}" text-anchor="middle">10-year ASCVD risk</text>')
    out.append("</svg>")
    # Safe as markup: every text above is a number we formatted, a constant, or passed through escape().
    return Markup("".join(out))  # noqa: S704


def _legend(left: int, right_edge: int) -> tuple[list[str], int]:
    """One swatch and its words per category, on as many top lines as the width needs (the colours never carry
    meaning alone), and the height they take."""
    out, x, y = [], float(left), 5
    for c in CATEGORIES:
        label = f"{CATEGORY_NAMES[c]} {CATEGORY_SHORT_RANGES[c]}"
        item = 14 + LEGEND_CHAR_WIDTH * len(label)
        if x > left and x + item > right_edge:
            x, y = float(left), y + 16
        out.append(
            f'<rect class="legend" x="{x:.1f}" y="{y}" width="10" height="10" fill="{PALETTE[c]}" stroke="{INK}" '
            'stroke-width="0.5"/>'
        )
        out.append(f'<text x="{x + 14:.1f}" y="{y + 9}">{escape(label)}</text>')
        x += item + 16
    return out, y + 10


def _x_ticks(x: Any, x0: float, x1: float, base: float) -> list[str]:
    """Percent ticks every 1, 2, 5, 10 or 20 %, whichever gives at most eight."""
    span = (x1 - x0) * 100
    step = next((s for s in (1, 2, 5, 10, 20, 50) if span / s <= 8), 100)
    out = []
    value = math.ceil(x0 * 100 / step - 1e-9) * step
    while value <= x1 * 100 + 1e-9:
        tx = x(value / 100)
        out.append(f'<line x1="{tx:.2f}" y1="{base}" x2="{tx:.2f}" y2="{base + 4}" stroke="{AXIS}"/>')
        out.append(f'<text x="{tx:.2f}" y="{base + 14}" text-anchor="middle">{_percent(value / 100)}</text>')
        value += step
    return out


def _describe(finite: list[_Bin], opened: _Bin | None, x0: float, x1: float, total: int) -> str:
    """The chart in one paragraph, for screen readers."""
    if total == 0:
        return "No scored patients to show."
    where = f"{len(finite)} bins from {_percent(x0)} to {_percent(x1)}"
    if opened:
        where += f" and one bin of {_percent(opened.low)} or more"
    tallest = max([*finite, *([opened] if opened else [])], key=lambda b: b.count)
    return (
        f"Histogram of {_patients(total)} scored, in {where}. The most patients, {tallest.count:,}, are in "
        f"{_bin_range(tallest.low, tallest.high)}. Dashed lines mark the category thresholds at 5 %, 7.5 % and "
        "20 %; bars are coloured by category, named in the legend."
    )


def _nice_step(raw: float) -> int:
    """The smallest 1, 2 or 5 times a power of ten at least ``raw`` (and at least 1)."""
    if raw <= 1:
        return 1
    power = 10 ** math.floor(math.log10(raw))
    return int(next(m * power for m in (1, 2, 5, 10) if m * power >= raw))


# ---- formatting -----------------------------------------------------------------------------------------------


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _number(value: Any) -> float | None:
    """A finite number, or None for anything else (booleans, strings, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _count(value: Any) -> int | None:
    """A non-negative whole count, or None."""
    number = _number(value)
    return int(number) if number is not None and number >= 0 and number == int(number) else None


def _text(value: Any) -> str | None:
    """A non-empty string, cut to a readable length; anything else is None (escaping is the template's)."""
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    return value if len(value) <= MAX_TEXT else value[: MAX_TEXT - 1] + "…"


def _without_ids(message: str) -> str:
    """An export error with resource ids and UUIDs removed: the page must not name a patient."""
    return _text(_UUID.sub("[id removed]", _REFERENCE.sub(r"\1/[id removed]", message))) or ""


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _instant_text(value: Any) -> str | None:
    """An ISO 8601 instant as UTC to the second; an unreadable one as given."""
    moment = _instant(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else _text(value)


def _int_text(value: int | None) -> str:
    return f"{value:,}" if value is not None else "not recorded"


def _share(part: int | None, whole: int | None, of: str = "") -> str:
    if part is None or not whole:
        return ""
    return f"{100 * part / whole:.1f} %" + (f" {of}" if of else "")


def _yes_no(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "not recorded"


def _duration_text(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "not recorded"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s"


def _rate_text(rate: float | None) -> str:
    if rate is None or rate < 0:
        return "not recorded"
    return f"{rate:,.1f} patients/s" if rate >= 10 else f"{rate:.2f} patients/s"


def _percent(fraction: float) -> str:
    """0.075 as "7.5 %", 0.05 as "5 %"."""
    return f"{fraction * 100:.1f}".removesuffix(".0") + " %"


def _bin_range(low: float, high: float | None) -> str:
    return f"{_percent(low)} or more" if high is None else f"{_percent(low)} to under {_percent(high)}"


def _patients(n: int) -> str:
    return f"{n:,} patient" + ("" if n == 1 else "s")
