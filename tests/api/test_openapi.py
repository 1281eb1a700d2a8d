"""The OpenAPI document describes every route the aggregator registers, and is a schema schemathesis accepts."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from aiohttp import web
from schemathesis.core.result import Err, Ok

from aggregator import api, openapi
from aggregator.config import AggregatorConfig
from aggregator.service import create_app
from federation.transport import TLSConfig
from fedsilo.certs import local_pki

# Static console files are not part of the REST API (they carry no data); everything else must be documented.
UNDOCUMENTED = re.compile(r"^/console(/|$)")


@pytest.fixture
def app(tmp_path: Path) -> Iterator[web.Application]:
    pki = local_pki(tmp_path / "pki", [])
    agg = pki.issued("aggregator", "aggregator")
    cfg = AggregatorConfig(
        port=0, state_url=f"sqlite:///{tmp_path / 'state.db'}", blob_url=f"file://{tmp_path / 'blobs'}",
        report_dir=tmp_path / "reports", tls=TLSConfig(ca_file=pki.ca_cert, cert_file=agg.cert, key_file=agg.key),
        signing_key=pki.signing_key,
    )
    application = create_app(cfg)
    yield application
    application[api.DB].shutdown()


def registered(app: web.Application) -> set[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter") or info.get("prefix")
        if route.method != "HEAD" and path and not UNDOCUMENTED.match(path):
            out.add((route.method.lower(), path))
    return out


def test_every_registered_route_is_documented(app: web.Application) -> None:
    doc = openapi.document()
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    routes = registered(app)
    assert len(routes) >= 15
    assert routes - documented == set(), "routes missing from aggregator/openapi.py"
    assert documented - routes == set(), "documented routes that do not exist"


def test_document_is_openapi_31_with_model_schemas() -> None:
    doc = openapi.document()
    assert doc["openapi"] == "3.1.0"
    schemas = doc["components"]["schemas"]
    # Request bodies are the very models the handlers validate with.
    submit = doc["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert submit == {"$ref": "#/components/schemas/JobSpec"}
    assert set(schemas["JobSpec"]["required"]) >= {"name", "dataset", "features", "model", "privacy", "sites"}
    # Every $ref resolves.
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc)))
    assert refs and refs <= set(schemas)
    # Operator routes name their security; schemathesis loads the whole document.
    assert doc["paths"]["/api/v1/jobs/{job_id}/cancel"]["post"]["security"] == openapi.OPERATOR
    schema = schemathesis.openapi.from_dict(doc)
    loaded = list(schema.get_all_operations())
    assert all(isinstance(op, Ok) for op in loaded), [op.err() for op in loaded if isinstance(op, Err)]
    assert len(loaded) == sum(len(ops) for ops in doc["paths"].values())
