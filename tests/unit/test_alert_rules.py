"""deploy/alerts.yaml: well-formed rules that read only metrics the service exposes, each with its runbook.

With promtool on PATH (Debian package `prometheus`) the rules are also checked by Prometheus's own parser, and each
alert is shown to fire on its condition and stay quiet otherwise (`promtool test rules`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.jobs.canary import CANARY
from app.jobs.registry import submit
from tests.conftest import PUBLIC_BASE_URL, require

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "alerts.yaml"
GUIDE = ROOT / "docs" / "operations.md"

# Series Prometheus makes itself for every target; the service does not expose them.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# Words of PromQL that look like metric names: aggregations, keywords and operators.
PROMQL_WORDS = {
    *("sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "group"),
    *("count_values", "limitk", "limit_ratio", "by", "without", "on", "ignoring", "group_left", "group_right"),
    *("and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"),
}
# Series the text format derives from one metric family, by its type.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
}


def rules() -> list[dict]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, label matchers, ranges and label lists removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", expr):
        word = match.group()
        if word.lower() in PROMQL_WORDS or expr[match.end() :].lstrip().startswith("("):
            continue  # an aggregation, a keyword or a function call
        names.add(word)
    return names


def guide_anchors() -> set[str]:
    """GitHub's anchors for the headings of docs/operations.md."""
    anchors = set()
    for line in GUIDE.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            text = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_the_expression_reader_finds_metric_names_and_nothing_else():
    expr = (
        'histogram_quantile(0.99, sum by (le, service) (rate(gateway_hook_seconds_bucket{job="x"}[5m]))) > 0.5 '
        "and on() max(gateway_workers_live) == 0 unless up offset 5m"
    )
    assert metric_names(expr) == {"gateway_hook_seconds_bucket", "gateway_workers_live", "up"}


def test_every_rule_has_a_severity_a_summary_and_a_runbook_section_in_the_production_guide():
    anchors = guide_anchors()
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names)), "alert names repeat"
    for rule in rules():
        assert rule["expr"].strip(), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "docs/operations.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor} in docs/operations.md"


def test_the_rules_watch_what_an_operator_must_hear_about():
    watched = set().union(*(metric_names(rule["expr"]) for rule in rules()))
    assert {
        "up",
        "gateway_jobs_ledger_up",
        "gateway_workers_live",
        "gateway_jobs",
        "gateway_jobs_oldest_queued_age_seconds",
        "gateway_breaker_state",
        "gateway_hook_seconds_bucket",
        "gateway_batch_runs",
        "gateway_batch_runs_paused",
    } <= watched


def test_every_metric_an_alert_reads_is_one_the_service_exposes(make_app, signing_key, hook_body):
    app = make_app()
    client = app.test_client()
    # Give every family a sample, in case the exposition leaves out families that have none: a job in the
    # ledger (gateway_jobs by kind) and a hook call (hook latency, the breaker's state).
    submit(app, CANARY, "alert-rules-canary", {})
    url = f"{PUBLIC_BASE_URL}/cds-services/cardiovascular-risk"
    headers = {"Authorization": f"Bearer {signing_key.token(url)}"}
    assert client.post("/cds-services/cardiovascular-risk", json=hook_body, headers=headers).status_code == 200

    response = client.get("/metrics")
    assert response.status_code == 200
    exposed = set()
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        exposed.add(family.name)
        exposed.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))
        exposed.update(sample.name for sample in family.samples)

    missing = {
        f"{rule['alert']}: {name}"
        for rule in rules()
        for name in metric_names(rule["expr"]) - PROMETHEUS_SERIES
        if name not in exposed
    }
    assert not missing, f"alert rules read metrics that /metrics does not expose: {sorted(missing)}"


def _promtool() -> str:
    promtool = shutil.which("promtool")
    require(None if promtool else "promtool is not on PATH (Debian package prometheus; .ci/run unpacks it)")
    return promtool


def test_promtool_accepts_the_rules():
    result = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# One promtool unit test per situation: series at a 1-minute interval, and the alerts expected at eval_time.
# Two replicas (a, b) report the same ledger gauges, as every replica reads the same database.
def _replicas(series: str, values: str) -> list[dict]:
    return [
        {"series": series.replace("{", f'{{job="gateway",instance="{host}",', 1), "values": values}
        for host in ("a:8080", "b:8080")
    ]


_QUEUED = 'gateway_jobs{kind="discharge-summary",state="queued"}'
_DEAD = 'gateway_jobs{kind="discharge-summary",state="dead"}'
_BUCKETS = (0.1, 0.5, 0.75, "+Inf")
PROMTOOL_CASES = [
    (
        "the last worker died while jobs wait",
        [*_replicas("gateway_workers_live{}", "1 1 0x10"), *_replicas(_QUEUED, "3x12")],
        [("GatewayNoLiveWorker", "6m", [{"severity": "critical"}])],
    ),
    (
        "no worker, but nothing queued",
        [*_replicas("gateway_workers_live{}", "0x10"), *_replicas(_QUEUED, "0x10")],
        [("GatewayNoLiveWorker", "6m", [])],
    ),
    (
        "a worker is alive and jobs wait",
        [*_replicas("gateway_workers_live{}", "1x10"), *_replicas(_QUEUED, "3x10")],
        [("GatewayNoLiveWorker", "6m", [])],
    ),
    (
        "a replica stops answering",
        [{"series": 'up{job="gateway",instance="a:8080"}', "values": "1 0x5"}],
        [("GatewayTargetDown", "4m", [{"severity": "warning", "job": "gateway", "instance": "a:8080"}])],
    ),
    (
        "a replica cannot read the ledger",
        [{"series": 'gateway_jobs_ledger_up{job="gateway",instance="a:8080"}', "values": "0x5"}],
        [("GatewayLedgerUnreadable", "4m", [{"severity": "critical", "job": "gateway", "instance": "a:8080"}])],
    ),
    (
        "a due job waits 10 minutes",
        _replicas("gateway_jobs_oldest_queued_age_seconds{}", "600x10"),
        [("GatewayQueuedJobTooOld", "6m", [{"severity": "warning"}])],
    ),
    (
        "due jobs are picked up within seconds",
        _replicas("gateway_jobs_oldest_queued_age_seconds{}", "2x10"),
        [("GatewayQueuedJobTooOld", "6m", [])],
    ),
    (
        "a job goes to the dead letter queue",
        _replicas(_DEAD, "2x5 3x5"),
        [("GatewayDeadLettersGrowing", "8m", [{"severity": "warning", "kind": "discharge-summary"}])],
    ),
    (
        "old dead jobs, none new",
        _replicas(_DEAD, "4x40"),
        [("GatewayDeadLettersGrowing", "35m", [])],
    ),
    (
        "a breaker keeps reopening (open, half-open, open)",
        _replicas('gateway_breaker_state{breaker="kserve-a"}', "0 2 2 1 2 2 1 2 2 1 2 2"),
        [("GatewayBreakerOpen", "10m", [{"severity": "warning", "breaker": "kserve-a"}])],
    ),
    (
        "a breaker opens once and closes",
        _replicas('gateway_breaker_state{breaker="kserve-a"}', "0 2 1 0x10"),
        [("GatewayBreakerOpen", "10m", [])],
    ),
    (
        "hooks take 0.5-0.75 s",
        [
            {
                "series": f'gateway_hook_seconds_bucket{{job="gateway",instance="a:8080",service="s",le="{le}"}}',
                "values": "0+0x20" if le in (0.1, 0.5) else "0+60x20",
            }
            for le in _BUCKETS
        ],
        [("GatewayHookLatencyOverBudget", "18m", [{"severity": "warning", "service": "s"}])],
    ),
    (
        "a batch run fails",
        _replicas('gateway_batch_runs{state="failed"}', "0x40 1x20"),
        [("GatewayBatchRunFailed", "45m", [{"severity": "warning"}]), ("GatewayBatchRunFailed", "75m", [])],
    ),
    (
        "failed runs from long ago, none new",
        _replicas('gateway_batch_runs{state="failed"}', "2x80"),
        [("GatewayBatchRunFailed", "70m", [])],
    ),
    (
        "a batch run waits for its model",
        _replicas("gateway_batch_runs_paused{}", "1x40"),
        [("GatewayBatchRunPaused", "35m", [{"severity": "warning"}]), ("GatewayBatchRunPaused", "20m", [])],
    ),
    (
        "hooks take under 0.1 s",
        [
            {
                "series": f'gateway_hook_seconds_bucket{{job="gateway",instance="a:8080",service="s",le="{le}"}}',
                "values": "0+60x20",
            }
            for le in _BUCKETS
        ],
        [("GatewayHookLatencyOverBudget", "18m", [])],
    ),
]


def test_each_alert_fires_on_its_condition_and_stays_quiet_otherwise(tmp_path):
    promtool = _promtool()
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")  # promtool compares annotations too; their wording is not under test here
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(document))
    tests = [
        {
            "name": name,
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [
                {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": labels} for labels in expected]}
                for alert, at, expected in checks
            ],
        }
        for name, series, checks in PROMTOOL_CASES
    ]
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "tests": tests}))
    result = subprocess.run(
        [promtool, "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
