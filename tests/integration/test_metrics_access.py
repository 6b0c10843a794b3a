"""GET /metrics on a live server: the operator key only (METRICS_REQUIRE_OPERATOR_KEY), or open."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.support import OPERATOR_KEY, Api, LiveServer, assert_error, make_settings


def test_metrics_need_the_operator_key_by_default(api: Api) -> None:
    _, user_auth = api.create_user("metrics-user")
    assert_error(api.http.get("/metrics"), 401, "missing_api_key")
    assert_error(api.http.get("/metrics", headers=user_auth), 403, "operator_only")
    wrong = {"Authorization": "Bearer not-the-operator-key-at-all"}
    assert_error(api.http.get("/metrics", headers=wrong), 401, "invalid_api_key")
    # What a Prometheus scrape config with `authorization: {credentials: <operator key>}` sends.
    scraped = api.http.get("/metrics", headers={"Authorization": f"Bearer {OPERATOR_KEY}"})
    assert scraped.status_code == 200 and "bapo_http_requests_total" in scraped.text
    assert scraped.headers["content-type"].startswith("text/plain")


def test_metrics_open_when_configured(tmp_path: Path) -> None:
    server = LiveServer(make_settings(tmp_path, metrics_require_operator_key=False)).start()
    try:
        response = httpx.get(f"{server.url}/metrics", timeout=30)
        assert response.status_code == 200 and "bapo_http_requests_total" in response.text
    finally:
        server.stop()


def test_the_openapi_document_says_metrics_may_refuse(api: Api) -> None:
    responses = api.http.get("/openapi.json").json()["paths"]["/metrics"]["get"]["responses"]
    assert {"200", "401", "403"} <= set(responses)
