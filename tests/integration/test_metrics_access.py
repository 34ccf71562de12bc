"""GET /metrics: open by default (no PHI in it), behind a bearer token when METRICS_TOKEN is set."""

from __future__ import annotations


def test_metrics_are_open_without_a_metrics_token(make_app):
    response = make_app().test_client().get("/metrics")
    assert response.status_code == 200
    assert b"gateway_jobs" in response.data


def test_with_a_metrics_token_only_its_bearer_reads_the_metrics(make_app):
    client = make_app(METRICS_TOKEN="scrape-secret-123").test_client()
    assert client.get("/metrics").status_code == 401
    wrong = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret-12"})
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    right = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret-123"})
    assert right.status_code == 200 and b"gateway_jobs" in right.data
