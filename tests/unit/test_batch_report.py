"""The population run's report: a self-contained page of counts only, its SVG chart drawn to scale, every string
escaped, and no patient id whatever the summary holds."""

from __future__ import annotations

import base64
import hashlib
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from app.batch.report import (
    PALETTE,
    bins_from_counts,
    content_security_policy,
    render_report,
    risk_histogram_svg,
)

SVG = "{http://www.w3.org/2000/svg}"
# Counts per 1 % of risk from 0 % to 30 %, then 30 % or more (the parts' histogram).
COUNTS = [5, 40, 80, 90, 70, 50, 30, 25, 20, 15, 12, 10, 8, 7, 6, 5, 5, 4, 3, 3, 2, 2, 2, 1, 1, 1, 1, 0, 0, 1, 9]
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def typical() -> dict:
    return {
        "version": 1,
        "run": "run-0123456789abcdef",
        "service": {"id": "cardiovascular-risk", "title": "10-year ASCVD risk"},
        "state": "succeeded",
        "created": "2026-03-01T09:00:00+00:00",
        "started": "2026-03-01T09:00:02Z",
        "finished": "2026-03-01T09:04:10Z",
        "updated": "2026-03-01T09:04:10Z",
        "parameters": {
            "service": "cardiovascular-risk",
            "client": "https://ehr.example.org",
            "fhirServer": "https://ehr.example.org/fhir",
            "group": "clinic-a",
            "since": None,
            "writeBack": True,
        },
        "transactionTime": "2026-03-01T09:00:05Z",
        "parts": {"done": 40, "total": 40},
        "counts": {
            "patients": 540,
            "scored": 508,
            "notScored": 32,
            "badLines": 2,
            "dropped": 3,
            "worklist": 133,
            "writtenBack": 131,
        },
        "byCategory": {"low": 285, "borderline": 90, "intermediate": 113, "high": 20},
        "notScoredReasons": {"age-out-of-range": 12, "missing-hdl": 20},
        "reasonLabels": {"missing-hdl": "No HDL cholesterol result"},
        "histogram": bins_from_counts(COUNTS),
        "durations": {"export": 31.2, "split": 0.8, "score": 212.5, "total": 248.0},
        "throughput": 2.18,
        "files": [{"name": "RiskAssessment.ndjson", "lines": 508, "sha256": SHA}],
        "errors": ["Observation: server error 500"],
    }


def text_of(html: str) -> str:
    """The page's words, tags dropped and spaces collapsed, as a reader sees them."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def bars(svg: str) -> list[ET.Element]:
    return [r for r in ET.fromstring(svg).iter(f"{SVG}rect") if r.get("class") == "bar"]


class TagBalance(HTMLParser):
    """Every element the page opens is closed, in order (void elements and self-closed SVG shapes aside)."""

    VOID = {"meta", "link", "br", "hr", "img", "input"}

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.mismatches: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.mismatches.append(tag)


def test_a_typical_run_shows_its_counts_by_category_and_reason_times_and_files():
    page = text_of(render_report(typical()))
    assert "10-year ASCVD risk" in page and "run-0123456789abcdef" in page and "succeeded" in page
    assert "Patients seen 540" in page and "Scored 508 94.1 % of patients seen" in page
    assert "Not scored 32 5.9 % of patients seen" in page
    assert "Unreadable input lines 2" in page and "On the worklist 133" in page and "Written back 131" in page
    assert "Resources left out 3 resources of no patient of this export" in page
    assert "Low under 5 % 285 56.1 %" in page
    assert "Borderline 5 % to under 7.5 % 90 17.7 %" in page
    assert "Intermediate 7.5 % to under 20 % 113 22.2 %" in page
    assert "High 20 % or more 20 3.9 %" in page
    # Reasons by count, with their label (or their code when the service gave none).
    assert "No HDL cholesterol result missing-hdl 20 62.5 %" in page
    assert "age-out-of-range age-out-of-range 12 37.5 %" in page
    assert page.index("missing-hdl 20") < page.index("age-out-of-range 12")
    assert "Export 31.2 s" in page and "Scoring 3 min 32 s" in page and "Total 4 min 08 s" in page
    assert "Throughput 2.18 patients/s" in page
    assert "Export transaction time 2026-03-01 09:00:05 UTC" in page and "Group clinic-a" in page
    assert f"RiskAssessment.ndjson 508 {SHA}" in page and "Observation: server error 500" in page
    assert "Counts only" in page and "no patient data" in page
    assert "in progress" not in page and "partial" not in page


def test_the_page_is_one_self_contained_file_without_script():
    html = render_report(typical())
    assert html.lstrip().lower().startswith("<!doctype html>")
    for needle in ("<script", "<link", "<img", "<iframe", "<object", "src=", "href=", "url(", "@import"):
        assert needle not in html.lower(), needle
    assert not re.search(r"\son[a-z]+\s*=", html, re.IGNORECASE)  # no event handler attributes
    checker = TagBalance()
    checker.feed(html)
    assert checker.mismatches == [] and checker.stack == []


def test_an_empty_summary_renders_with_every_figure_not_recorded():
    page = text_of(render_report({}))
    assert "unknown run" in page and "Patients seen not recorded" in page
    assert "Total not recorded" in page and "Throughput not recorded" in page
    assert "No risk distribution was recorded" in page and "No files recorded yet" in page
    assert "The state of this run is not known: the counts below may be partial" in page


def test_a_run_of_zero_patients_says_so_and_draws_an_empty_chart():
    summary = typical()
    summary.update(
        counts={"patients": 0, "scored": 0, "notScored": 0, "badLines": 0, "worklist": 0, "writtenBack": 0},
        byCategory={"low": 0, "borderline": 0, "intermediate": 0, "high": 0},
        notScoredReasons={},
        histogram=bins_from_counts([0] * 31),
        throughput=0.0,
    )
    html = render_report(summary)
    page = text_of(html)
    assert "The export held no patients" in page and "Patients seen 0" in page and "Low under 5 % 0 " in page
    assert "No scored patients" in page and "Throughput 0.00 patients/s" in page
    svg = re.search(r"<svg xmlns=.*?</svg>", html, re.DOTALL).group(0)
    assert bars(svg) == []


def test_a_run_in_progress_says_its_counts_are_partial():
    summary = typical()
    summary.update(state="scoring", finished=None, updated="2026-03-01T09:02:00Z", parts={"done": 12, "total": 40})
    del summary["durations"]["total"], summary["throughput"], summary["files"]
    page = text_of(render_report(summary))
    assert "in progress: scoring" in page
    assert "every count below is partial, as of 2026-03-01 09:02:00 UTC (12 of 40 parts scored)" in page
    assert "Finished not yet" in page and "Total not recorded" in page


@pytest.mark.parametrize(("state", "words"), [("failed", "This run failed"), ("cancelled", "was cancelled")])
def test_a_run_that_stopped_early_says_its_counts_cover_only_part(state, words):
    page = text_of(render_report({**typical(), "state": state}))
    assert words in page and "cover only the patients handled until then" in page


def test_missing_and_wrongly_typed_fields_render_as_not_recorded():
    summary = {
        "run": 7,
        "service": "cardiovascular-risk",
        "counts": [1, 2],
        "byCategory": {"low": "7", "high": -1, "intermediate": 2.5},
        "histogram": "none",
        "files": [1, {"name": None, "lines": "x"}],
        "errors": [None, 3, ""],
        "durations": {"total": -5, "export": float("nan")},
        "parameters": {"writeBack": "yes"},
        "created": "yesterday",
    }
    page = text_of(render_report(summary))
    assert "unknown run" in page and "Low under 5 % not recorded" in page and "High 20 % or more not recorded" in page
    assert "Created yesterday" in page and "Write-back not recorded" in page and "unnamed not recorded" in page
    assert "Export errors None." in page


def test_the_total_and_the_throughput_are_derived_when_missing():
    summary = typical()
    summary.update(started="2026-03-01T09:00:00Z", finished="2026-03-01T09:01:40Z", throughput=None, durations={})
    page = text_of(render_report(summary))
    assert "Total 1 min 40 s" in page and "Throughput 5.40 patients/s" in page


def test_write_back_not_asked_for_shows_off_instead_of_a_count():
    summary = typical()
    summary["parameters"]["writeBack"] = False
    page = text_of(render_report(summary))
    assert "Write-back no" in page and "Written back off write-back was not asked for" in page


def test_the_chart_is_well_formed_svg_with_a_title_and_a_description():
    svg = risk_histogram_svg(bins_from_counts(COUNTS))
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg" and root.get("role") == "img"
    labelled_by = root.get("aria-labelledby").split()
    ids = {e.get("id"): e for e in root if e.get("id")}
    assert [ids[i].tag for i in labelled_by] == [f"{SVG}title", f"{SVG}desc"]
    assert "508 patients scored" in ids[labelled_by[1]].text
    words = [t.text for t in root.iter(f"{SVG}text")]
    assert "Patients" in words and "10-year ASCVD risk" in words and "≥30 %" in words
    # The legend names each category in words, next to its colour.
    assert {"Low <5 %", "Borderline 5–<7.5 %", "Intermediate 7.5–<20 %", "High ≥20 %"} <= set(words)
    legend = [r.get("fill") for r in root.iter(f"{SVG}rect") if r.get("class") == "legend"]
    assert legend == list(PALETTE.values())


def test_the_chart_inside_the_page_parses_as_xml_too():
    html = render_report(typical())
    svg = re.search(r"<svg xmlns=.*?</svg>", html, re.DOTALL).group(0)
    assert len(bars(svg)) == sum(1 for n in COUNTS if n)


def test_bar_heights_are_proportional_to_counts_and_empty_bins_draw_no_bar():
    drawn = bars(risk_histogram_svg(bins_from_counts(COUNTS)))
    counts = [int(r.get("data-count")) for r in drawn]
    assert counts == [n for n in COUNTS if n]
    per_patient = float(drawn[3].get("height")) / 90  # the tallest bar, 3 % to 4 %
    for rect, n in zip(drawn, counts, strict=True):
        assert float(rect.get("height")) == pytest.approx(n * per_patient, abs=0.01)
        # Bars stand on one baseline.
        assert float(rect.get("y")) + float(rect.get("height")) == pytest.approx(
            float(drawn[0].get("y")) + float(drawn[0].get("height")), abs=0.01
        )
    widths = {round(float(r.get("width")), 1) for r in drawn[:-1]}
    assert len(widths) == 1  # 1 %-wide bins, one width; the open bin stands apart


def test_bars_are_coloured_by_the_category_of_their_risk():
    drawn = bars(risk_histogram_svg(bins_from_counts(COUNTS)))
    by_low = {round(i / 100, 2): r for i, r in enumerate(drawn)}  # the first 27 bins are all non-empty
    assert by_low[0.03].get("fill") == PALETTE["low"] and by_low[0.06].get("fill") == PALETTE["borderline"]
    assert by_low[0.12].get("fill") == PALETTE["intermediate"] and by_low[0.21].get("fill") == PALETTE["high"]
    assert drawn[-1].get("fill") == PALETTE["high"]  # 30 % or more


def test_the_category_thresholds_are_drawn_where_the_risk_axis_puts_them():
    root = ET.fromstring(risk_histogram_svg(bins_from_counts(COUNTS)))
    lines = {
        float(line.get("data-risk")): float(line.get("x1"))
        for line in root.iter(f"{SVG}line")
        if line.get("class") == "threshold"
    }
    assert sorted(lines) == [0.05, 0.075, 0.2]
    drawn = {round(float(r.get("x")), 0): r for r in bars(ET.tostring(root, encoding="unicode"))}
    edges = sorted(drawn)
    # 5 % is the edge between the 4-5 % and the 5-6 % bars; 7.5 % halves the 7-8 % bar.
    four, five, seven = edges[4], edges[5], edges[7]
    assert four < lines[0.05] < five + 1
    seven_bar = drawn[seven]
    middle = float(seven_bar.get("x")) + float(seven_bar.get("width")) / 2
    assert lines[0.075] == pytest.approx(middle, abs=1)
    labels = {t.text for t in root.iter(f"{SVG}text")}
    assert {"5 %", "7.5 %", "20 %"} <= labels


def test_a_bin_that_straddles_a_threshold_says_which_categories_it_may_hold():
    page = text_of(render_report(typical()))
    assert "7 % to under 8 % Borderline or intermediate 25" in page
    assert "8 % to under 9 % Intermediate 20" in page


def test_hostile_strings_are_escaped_everywhere():
    attack = "<script>alert(1)</script>"
    summary = typical()
    summary.update(
        run='run"><img src=x onerror=alert(1)>',
        service={"id": attack, "title": attack},
        notScoredReasons={attack: 3},
        reasonLabels={attack: "<b>bold</b>"},
        errors=[attack],
        files=[{"name": attack, "lines": 1, "sha256": attack}],
        parameters={"fhirServer": attack, "group": attack, "client": attack, "writeBack": False},
        byCategory={**typical()["byCategory"], attack: 1},
    )
    html = render_report(summary)
    assert "<script" not in html and "<img" not in html and "<b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    checker = TagBalance()
    checker.feed(html)
    assert checker.mismatches == [] and checker.stack == []


def test_no_patient_id_reaches_the_page_whatever_the_summary_holds():
    summary = typical()
    summary["patients"] = ["Patient/pat-secret-1"]
    summary["worklist"] = [{"patient": "pat-secret-2", "risk": 0.21}]
    summary["counts"]["ids"] = ["pat-secret-3"]
    summary["parameters"]["patient"] = "pat-secret-4"
    summary["errors"] = [
        "Patient/pat-secret-5: export failed",
        "Observation for subject 2f4c9c55-1e7a-4b8e-9a55-6f7f0e1d2c3b was refused",
    ]
    html = render_report(summary)
    assert "secret" not in html and "2f4c9c55" not in html
    assert "Patient/[id removed]: export failed" in text_of(html)


def test_bins_from_counts_gives_the_last_count_an_open_bin():
    assert bins_from_counts([1, 2, 3]) == [
        {"low": 0.0, "high": 0.01, "count": 1},
        {"low": 0.01, "high": 0.02, "count": 2},
        {"low": 0.02, "high": None, "count": 3},
    ]
    assert bins_from_counts([]) == []


def test_the_content_security_policy_allows_the_page_style_and_nothing_else():
    html = render_report(typical())
    css = html.split("<style>", 1)[1].split("</style>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()
    policy = content_security_policy(html)
    assert f"style-src 'sha256-{digest}';" in policy and "default-src 'none'" in policy
    assert "unsafe" not in policy and "script-src" not in policy
