"""The Helm charts: lint and render with each representative values file (deploy/helm/*/ci/), validate every
rendered manifest against the Kubernetes schemas, and check what issue 7 asks of each chart in the output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from agent.config import AgentConfig
from agent.policy import SitePolicy
from aggregator.config import AggregatorConfig
from fedsilo.broker import acl_for
from tests.deploy._helm import KUBERNETES_VERSION, cases, manifests, one, template, values_files
from tests.deploy._tools import CHARTS, DEPLOY, GRAFANA, run, tool

# Custom resources: kubernetes-validate has no schema for them; their shape is checked here instead.
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor")}
CASES = cases()
IDS = [f"{chart}-{values.stem}" for chart, values in CASES]


def container(docs: list[dict[str, Any]], deployment: str, name: str) -> dict[str, Any]:
    spec = one(docs, "Deployment", deployment)["spec"]["template"]["spec"]
    (c,) = [c for c in spec["containers"] if c["name"] == name]
    return dict(c)


def assert_hardened(deployment: dict[str, Any]) -> None:
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] >= 10000
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["limits"] and c["resources"]["requests"]


def same_layout(rendered: dict[str, Any], reference: dict[str, Any]) -> None:
    """The chart's config uses the image's paths (deploy/config/*.yaml): every path-valued field agrees (blobs
    in S3 have no path)."""
    for key, value in reference.items():
        if key == "blob_url" and str(rendered[key]).startswith("s3://"):
            continue
        if (isinstance(value, str) and value.startswith(("/", "sqlite:", "file:"))) or key == "tls":
            assert rendered[key] == value, f"{key}: chart {rendered[key]!r}, image {value!r}"


@pytest.mark.parametrize(("chart", "values"), CASES, ids=IDS)
def test_helm_lint(chart: str, values: Path) -> None:
    run(tool("helm"), "lint", "--strict", CHARTS / chart, "-f", values, "--kube-version", KUBERNETES_VERSION)


@pytest.mark.parametrize(("chart", "values"), CASES, ids=IDS)
def test_every_rendered_manifest_matches_the_kubernetes_schemas(chart: str, values: Path) -> None:
    docs = manifests(chart, values)
    assert docs
    for doc in docs:
        where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        assert doc["metadata"].get("namespace"), f"{where}: no namespace"
        assert doc["kind"] != "Secret", f"{where}: charts reference Secrets, they never carry them"
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_RESOURCES:
            endpoints = doc["spec"]["endpoints"]
            assert doc["spec"]["selector"]["matchLabels"] and endpoints and endpoints[0]["path"] == "/metrics"
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{values.name}: {where} is invalid: {exc.message} at {list(exc.path)}", pytrace=False)


# ---------------------------------------------------------------------------------------------------- agent
@pytest.mark.parametrize("values", values_files("agent"), ids=lambda p: p.stem)
def test_agent_chart(values: Path) -> None:
    given = yaml.safe_load(values.read_text())
    docs = manifests("agent", values)
    name = f"fedsilo-agent-{given['site']}"
    deployment = one(docs, "Deployment", name)
    assert_hardened(deployment)
    pod = deployment["spec"]["template"]["spec"]

    config_map = one(docs, "ConfigMap", name)["data"]
    config = AgentConfig.model_validate(yaml.safe_load(config_map["agent.yaml"]))
    assert config.site == given["site"]
    same_layout(yaml.safe_load(config_map["agent.yaml"]), yaml.safe_load((DEPLOY / "config/agent.yaml").read_text()))
    policy = SitePolicy.model_validate(yaml.safe_load(config_map["policy.yaml"]))
    assert policy.site == given["site"]

    agent = container(docs, name, "agent")
    assert agent["args"] == ["agent", "run", "--config", "/etc/fedsilo/config/agent.yaml"]
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert [p["containerPort"] for p in agent["ports"] if p["name"] == "status"] == [config.status_port]
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert mounts["/var/fedsilo/agent"]["name"] == "state" and mounts["/etc/fedsilo/tls"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == given["tls"]["existingSecret"]
    claim = volumes["state"]["persistentVolumeClaim"]["claimName"]
    existing = given.get("persistence", {}).get("existingClaim")
    assert claim == existing if existing else one(docs, "PersistentVolumeClaim", claim)

    # Egress: only the broker's and the aggregator's addresses and ports, and DNS.
    netpol = one(docs, "NetworkPolicy", name)["spec"]
    assert set(netpol["policyTypes"]) == {"Ingress", "Egress"}
    egress = [({b["ipBlock"]["cidr"] for b in rule["to"] if "ipBlock" in b}, {p["port"] for p in rule["ports"]})
              for rule in netpol["egress"]]
    assert egress[0] == (set(given["broker"]["cidrs"]), {config.broker.port})
    assert egress[1] == (set(given["aggregator"]["cidrs"]), {config.aggregator_url.port})
    assert egress[2] == (set(), {53})
    assert len(egress) == 3 and all(rule.get("to") for rule in netpol["egress"]), "no rule may allow any destination"
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == (1 if given.get("serviceMonitor", {}).get("enabled") else 0)


@pytest.mark.parametrize(("sets", "message"), [
    (("policy.site=hungary",), "policy.site is \"hungary\" but site is \"cleveland\""),
    (("broker.port=1883",), "policy.egress.allowed_endpoints must list broker.fedsilo.example:1883"),
    (("tls.existingSecret=",), "tls.existingSecret is required"),
    (("site=Cleveland",), "does not match pattern"),
    (("broker.cidrs=null",), "broker.cidrs is required"),
])
def test_agent_chart_refuses_values_the_agent_would_refuse(sets: tuple[str, ...], message: str) -> None:
    error = template("agent", values_files("agent")[0], sets=sets, expect_error=True)
    assert message in error, error


def test_agent_chart_refuses_a_metric_name_yaml_reads_as_a_boolean(tmp_path: Path) -> None:
    override = tmp_path / "override.yaml"
    override.write_text("policy:\n  egress:\n    allowed_metrics: [auc, n]\n")
    error = template("agent", values_files("agent")[0], override, expect_error=True)
    assert "policy.egress.allowed_metrics has false (bool), not a metric name: quote it" in error, error


# ----------------------------------------------------------------------------------------------- aggregator
@pytest.mark.parametrize("values", values_files("aggregator"), ids=lambda p: p.stem)
def test_aggregator_chart(values: Path, tmp_path: Path) -> None:
    given = yaml.safe_load(values.read_text())
    docs = manifests("aggregator", values)
    deployment = one(docs, "Deployment", "fedsilo")
    assert_hardened(deployment)
    pod = deployment["spec"]["template"]["spec"]
    text = one(docs, "ConfigMap", "fedsilo")["data"]["aggregator.yaml"]
    assert "postgresql" not in text, "the database URL stays in its Secret"
    rendered = yaml.safe_load(text)
    config = AggregatorConfig.model_validate(rendered)
    same_layout(rendered, yaml.safe_load((DEPLOY / "config/aggregator.yaml").read_text()))
    agg = container(docs, "fedsilo", "aggregator")
    assert agg["args"] == ["aggregator", "serve", "--config", "/etc/fedsilo/config/aggregator.yaml"]
    assert agg["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "https", "scheme": "HTTPS"}
    assert [p["containerPort"] for p in agg["ports"]] == [config.port]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == given["tls"]["existingSecret"]
    assert volumes["signing"]["secret"]["secretName"] == given["signingKey"]["existingSecret"]

    account = one(docs, "ServiceAccount", "fedsilo")
    role = given.get("serviceAccount", {}).get("roleArn")
    assert account["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn") == role
    sagemaker = given.get("tracking", {}).get("sagemaker", {})
    assert (config.tracking.sagemaker is not None) == bool(sagemaker.get("enabled"))
    if sagemaker.get("artifactBucket"):
        assert config.tracking.sagemaker is not None
        assert config.tracking.sagemaker.artifact_bucket == sagemaker["artifactBucket"]

    s3 = given.get("blobs", {}).get("s3", {})
    if s3.get("bucket"):
        assert config.blob_url == f"s3://{s3['bucket']}/{s3['prefix']}"
        assert (config.blob_s3.region, config.blob_s3.kms_key_id) == (s3.get("region"), s3.get("kmsKeyId"))
        assert config.blob_s3.retry_mode == s3.get("retryMode", "standard")
    else:
        assert config.blob_url == "file:///var/fedsilo/aggregator/blobs"

    database = given.get("database", {}).get("existingSecret")
    if database:
        assert volumes["database"]["secret"]["secretName"] == database
        check_config_init_container(pod, text, tmp_path)
    else:
        assert "initContainers" not in pod and config.state_url.startswith("sqlite:////var/fedsilo/aggregator/")

    mosquitto = given.get("mosquitto", {}).get("enabled", True)
    if mosquitto:
        broker = one(docs, "ConfigMap", "fedsilo-mosquitto")["data"]
        assert broker["acl"] == acl_for(given["sites"]), "the broker's ACL is fedsilo.broker.acl_for(sites)"
        conf = broker["mosquitto.conf"]
        for line in ("require_certificate true", "use_identity_as_username true", "allow_anonymous false",
                     "acl_file /mosquitto/config/acl", f"listener {config.broker.port} 0.0.0.0"):
            assert line in conf.splitlines()
        assert config.broker.host == "fedsilo-mosquitto"
        one(docs, "Service", "fedsilo-mosquitto")
        assert_hardened(one(docs, "Deployment", "fedsilo-mosquitto"))
    else:
        assert config.broker.host == given["broker"]["host"]
        assert not [d for d in docs if "mosquitto" in d["metadata"]["name"]]

    if given.get("ingress", {}).get("enabled"):
        ingress = one(docs, "Ingress", "fedsilo")
        assert ingress["spec"]["tls"][0]["hosts"] == [given["ingress"]["host"]]
        assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/ssl-passthrough"] == "true"

    dashboards = [d for d in docs if d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert sorted(name for d in dashboards for name in d["data"]) == sorted(p.name for p in GRAFANA.glob("*.json"))
    for d in dashboards:
        ((name, body),) = d["data"].items()
        assert json.loads(body) == json.loads((GRAFANA / name).read_text())
        assert d["metadata"]["namespace"] == given.get("dashboards", {}).get("namespace", "fedsilo")


def check_config_init_container(pod: dict[str, Any], template_text: str, tmp_path: Path) -> None:
    """Run the init container's own script (paths moved under tmp_path): it must add the Secret's URL."""
    (init,) = pod["initContainers"]
    assert init["command"][:2] == ["python", "-c"]
    root = tmp_path / "etc"
    for sub in ("config-template", "database", "config"):
        (root / sub).mkdir(parents=True)
    (root / "config-template" / "aggregator.yaml").write_text(template_text)
    (root / "database" / "url").write_text("postgresql://fedsilo:pw@db.internal:5432/fedsilo\n")
    script = init["command"][2].replace("/etc/fedsilo", str(root))
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    out = AggregatorConfig.load(root / "config" / "aggregator.yaml")
    assert out.state_url == "postgresql://fedsilo:pw@db.internal:5432/fedsilo"


@pytest.mark.parametrize(("sets", "message"), [
    (("blobs.s3.bucket=Fedsilo_Blobs",), "does not match pattern"),
    (("blobs.s3.prefix=/leading",), "does not match pattern"),
    (("blobs.s3.retryMode=legacy",), "/blobs/s3/retryMode"),
    (("blobs.s3.maxAttempts=0",), "/blobs/s3/maxAttempts"),
])
def test_aggregator_chart_refuses_bad_blob_settings(sets: tuple[str, ...], message: str) -> None:
    error = template("aggregator", CHARTS / "aggregator" / "ci" / "production-values.yaml", sets=sets,
                     expect_error=True)
    assert message in error, error


def test_aggregator_chart_acl_follows_the_site_list() -> None:
    values = CHARTS / "aggregator" / "ci" / "sqlite-mosquitto-values.yaml"
    docs = manifests("aggregator", values, sets=("sites={zurich,a-site,zurich}",))
    assert one(docs, "ConfigMap", "fedsilo-mosquitto")["data"]["acl"] == acl_for(["zurich", "a-site"])
