"""The operator API against a real aggregator (HTTPS with the federation CA, its own broker, SQLite):
roles, the console's data endpoints, the open static files and OpenAPI document, and a property-based run of
every documented operation (schemathesis) that must never get a 5xx.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from aggregator import openapi
from fedsilo.client import AggregatorClient, ApiError
from fedsilo.local import LocalFederation

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """An aggregator with its broker and no agents: offers wait for answers that never come."""
    f = LocalFederation(tmp_path_factory.mktemp("api"), {})
    f.broker.start()
    try:
        f.start_aggregator()
        yield f
    finally:
        f.stop()


def ca_context(fed: LocalFederation) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(fed.pki.ca_cert))


def as_(fed: LocalFederation, who: str | None) -> AggregatorClient:
    """A client that trusts the federation CA and presents a bearer token (or nothing), never a certificate."""
    return AggregatorClient(fed.url, ca_context(fed), token=fed.tokens[who][1] if who else None)


def get(fed: LocalFederation, path: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(fed.url + path, context=ca_context(fed), timeout=10) as resp:
        return resp.status, dict(resp.headers), resp.read()


def test_roles_from_tokens_and_certificates(fed: LocalFederation) -> None:
    assert as_(fed, "ops-viewer").request("GET", "/api/v1/me") == {"name": "ops-viewer", "role": "viewer"}
    assert as_(fed, "ops-admin").request("GET", "/api/v1/me") == {"name": "ops-admin", "role": "admin"}
    assert fed.client.request("GET", "/api/v1/me") == {"name": "operator", "role": "admin"}  # certificate
    with pytest.raises(ApiError) as exc:
        as_(fed, None).request("GET", "/api/v1/jobs")
    assert exc.value.status == 401
    bad = AggregatorClient(fed.url, ca_context(fed), token="not-a-token")
    with pytest.raises(ApiError) as exc:
        bad.request("GET", "/api/v1/me")
    assert exc.value.status == 401


def test_viewer_reads_but_cannot_change_jobs(fed: LocalFederation) -> None:
    admin, viewer = as_(fed, "ops-admin"), as_(fed, "ops-viewer")
    job_id = admin.submit(EXAMPLE.read_text())
    with pytest.raises(ApiError) as exc:
        viewer.submit(EXAMPLE.read_text())
    assert exc.value.status == 403 and exc.value.body["error"] == "wrong_role"
    for action in (viewer.pause, viewer.resume, viewer.cancel):
        with pytest.raises(ApiError) as exc:
            action(job_id)
        assert exc.value.status == 403
    row = next(j for j in viewer.jobs() if j["job_id"] == job_id)
    assert row["state"] == "offered" and row["paused"] is False and row["deadline"] is None
    assert (row["min_sites"], row["quorum"], row["round_deadline_s"]) == (3, 1.0, 60)
    assert row["sites"] == ["cleveland", "hungary", "switzerland", "va-long-beach"]
    admin.cancel(job_id)
    assert viewer.job(job_id)["state"] == "cancelled"


def test_decisions_per_site(fed: LocalFederation) -> None:
    admin = as_(fed, "ops-admin")
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec.update(sites=["hungary", "cleveland"], min_sites=1)
    job_id = admin.submit(yaml.safe_dump(spec))
    rows = admin.request("GET", "/api/v1/decisions?site=hungary")
    mine = [r for r in rows if r["job_id"] == job_id]
    assert mine == [{"job_id": job_id, "site": "hungary", "decision": "offered", "reasons": [],
                     "epsilon_planned": None, "epsilon_spent": None, "epsilon_unit": "record", "at": mine[0]["at"],
                     "job_state": "offered"}]
    assert {r["site"] for r in admin.request("GET", "/api/v1/decisions") if r["job_id"] == job_id} == {
        "hungary", "cleveland"}
    admin.cancel(job_id)


def test_console_and_openapi_are_served_without_auth(fed: LocalFederation) -> None:
    status, headers, body = get(fed, "/console/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert b'<script type="module" src="app.js">' in body
    for name, kind in (("app.js", "text/javascript"), ("chart.js", "text/javascript"), ("console.css", "text/css")):
        status, headers, _ = get(fed, f"/console/{name}")
        assert status == 200 and headers["Content-Type"].startswith(kind)
    with pytest.raises(urllib.error.HTTPError) as exc:
        get(fed, "/console/..%2fapi.py")
    assert exc.value.code == 404
    status, _, body = get(fed, "/openapi.json")
    assert status == 200 and json.loads(body)["openapi"] == "3.1.0"


@pytest.fixture(scope="module")
def api_schema(fed: LocalFederation) -> Any:
    """The document as the running aggregator serves it."""
    return schemathesis.openapi.from_url(fed.url + "/openapi.json", verify=str(fed.pki.ca_cert))


@pytest.fixture(scope="module")
def session(fed: LocalFederation) -> Iterator[requests.Session]:
    """Trusts the federation CA and sends the admin token, so every operation is reached past the auth check."""
    s = requests.Session()
    s.verify = str(fed.pki.ca_cert)
    s.headers["Authorization"] = f"Bearer {fed.tokens['ops-admin'][1]}"
    yield s
    s.close()


OPERATIONS = [(method, path) for path, ops in openapi.document()["paths"].items() for method in ops]


# Driven through hypothesis directly: schemathesis' pytest plugin (`from_fixture`) does not run on pytest 9.
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m.upper()} {p}" for m, p in OPERATIONS])
def test_no_server_errors(
    method: str, path: str, api_schema: Any, fed: LocalFederation, session: requests.Session
) -> None:
    operation = api_schema[path][method]

    @settings(max_examples=20, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    @given(case=operation.as_strategy())
    def check(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(base_url=fed.url, session=session, verify=session.verify, checks=[not_a_server_error])

    check()


@pytest.mark.parametrize(("body", "content_type", "detail"), [
    (b"\xff\xfe", "application/yaml", "not UTF-8"),
    (b"[" * 100_000, "application/json", "nested too deeply"),
    (b"[" * 100_000, "application/yaml", "nested too deeply"),
    (b"{not: [valid", "application/yaml", "not valid JSON/YAML"),
])
def test_unparseable_jobs_are_refused_with_400(
    fed: LocalFederation, body: bytes, content_type: str, detail: str
) -> None:
    with pytest.raises(ApiError) as exc:
        as_(fed, "ops-admin").request("POST", "/api/v1/jobs", body, content_type)
    assert exc.value.status == 400 and exc.value.body["error"] == "unparseable_job"
    assert detail in exc.value.body["detail"]


@pytest.mark.parametrize("rnd", ["-1", "1000001", "1149288808450584739840", "x"])
def test_out_of_range_rounds_are_refused_with_400(fed: LocalFederation, rnd: str) -> None:
    with pytest.raises(ApiError) as exc:
        as_(fed, "ops-admin").request("POST", f"/api/v1/jobs/j/rounds/{rnd}/evaluation", b"{}")
    assert exc.value.status == 400 and exc.value.body["error"] == "bad_round"
