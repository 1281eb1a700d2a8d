"""The Helm charts: lint and render with each representative values file (deploy/helm/*/ci/), validate every
rendered manifest against the Kubernetes schemas, and check what issue 7 asks of each chart in the output."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from agent.config import AgentConfig
from agent.policy import SitePolicy
from aggregator.config import AggregatorConfig
from federation.transport import TLSConfig
from fedsilo.broker import acl_for
from fedsilo.certs import Pki
from tests.deploy._chart_identities import check_identity_files
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


def assert_hardened(deployment: dict[str, Any], replicas: int = 1) -> None:
    spec = deployment["spec"]
    assert spec["replicas"] == replicas
    if deployment["kind"] == "StatefulSet":  # one pod at a time by construction: it stops before its successor
        assert spec["podManagementPolicy"] == "OrderedReady" and spec["serviceName"]
    elif replicas == 1:  # a ReadWriteOnce volume, or a singleton: the old pod stops before the new one starts
        assert spec["strategy"]["type"] == "Recreate"
    else:  # no volume to hand over: a rollout adds a replica before it removes one
        assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
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
    replicas = given.get("replicaCount", 1)
    assert_hardened(deployment, replicas)
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
    check_identity_files(docs, given, config)

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
        check_config_init_container(pod, text, tmp_path, replicas)
    else:
        assert "initContainers" not in pod and config.state_url.startswith("sqlite:////var/fedsilo/aggregator/")
    if replicas > 1:
        check_replicas(docs, pod, volumes)
    else:
        assert not [d for d in docs if d["kind"] == "PodDisruptionBudget" or d["metadata"]["name"] == "fedsilo-peers"]
        assert "topologySpreadConstraints" not in pod
        claim = volumes["state"]["persistentVolumeClaim"]["claimName"]
        existing = given.get("persistence", {}).get("existingClaim")
        assert claim == existing if existing else one(docs, "PersistentVolumeClaim", claim)

    mosquitto = given.get("mosquitto", {}).get("enabled", True)
    if mosquitto:
        broker = one(docs, "ConfigMap", "fedsilo-mosquitto")["data"]
        assert broker["acl"] == acl_for(given["sites"]), "the broker's ACL is fedsilo.broker.acl_for(sites)"
        conf = broker["mosquitto.conf"]
        for line in ("require_certificate true", "use_identity_as_username true", "allow_anonymous false",
                     "acl_file /mosquitto/config/acl", f"listener {config.broker.port} 0.0.0.0",
                     f"message_size_limit {config.mqtt_max_publish_bytes}"):
            assert line in conf.splitlines()
        assert config.broker.host == "fedsilo-mosquitto"
        one(docs, "Service", "fedsilo-mosquitto")
        assert_hardened(one(docs, "StatefulSet", "fedsilo-mosquitto"))
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


POD_NAME, POD_IP = "fedsilo-7d9f8b6c5d-x2k4q", "10.10.3.17"


def check_config_init_container(pod: dict[str, Any], template_text: str, tmp_path: Path, replicas: int) -> None:
    """Run the init container's own script (paths moved under tmp_path) with the environment the pod spec gives
    it (the downward API's values filled in): it must add the Secret's URL, the pod's name as replica_id and,
    with several replicas, the pod's advertise_url."""
    (init,) = pod["initContainers"]
    assert init["command"][:2] == ["python", "-c"]
    downward = {"metadata.name": POD_NAME, "status.podIP": POD_IP}
    env = {e["name"]: e["value"] if "value" in e else downward[e["valueFrom"]["fieldRef"]["fieldPath"]]
           for e in init["env"]}
    root = tmp_path / "etc"
    for sub in ("config-template", "database", "config"):
        (root / sub).mkdir(parents=True)
    (root / "config-template" / "aggregator.yaml").write_text(template_text)
    (root / "database" / "url").write_text("postgresql://fedsilo:pw@db.internal:5432/fedsilo\n")
    script = init["command"][2].replace("/etc/fedsilo", str(root))
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30, env=env)
    out = AggregatorConfig.load(root / "config" / "aggregator.yaml")
    assert out.state_url == "postgresql://fedsilo:pw@db.internal:5432/fedsilo"
    added = {"state_url", "replica_id", "advertise_url"}  # and nothing else changes (crl_file, operators_file...)
    assert out.model_dump(exclude=added) == AggregatorConfig.model_validate(yaml.safe_load(template_text)).model_dump(
        exclude=added)
    assert out.replica_id == POD_NAME
    if replicas > 1:
        assert out.advertise_url == f"https://10-10-3-17.fedsilo-peers.fedsilo.svc.cluster.local:{out.port}"
    else:
        assert out.advertise_url is None


def check_replicas(docs: list[dict[str, Any]], pod: dict[str, Any], volumes: dict[str, Any]) -> None:
    """Several replicas: no claim for state (PostgreSQL and S3 hold it), a PodDisruptionBudget, a spread over
    zones and nodes, a headless Service for the replicas' names, and the NetworkPolicy lets them reach each
    other."""
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim" and "mosquitto" not in d["metadata"]["name"]]
    assert "emptyDir" in volumes["state"] and "persistentVolumeClaim" not in volumes["state"]
    selector = one(docs, "Deployment", "fedsilo")["spec"]["selector"]["matchLabels"]
    budget = one(docs, "PodDisruptionBudget", "fedsilo")["spec"]
    assert budget == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert set(spread) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for c in spread.values():
        assert c["maxSkew"] == 1 and c["whenUnsatisfiable"] == "DoNotSchedule"
        assert c["labelSelector"]["matchLabels"] == selector and c["matchLabelKeys"] == ["pod-template-hash"]
    peers = one(docs, "Service", "fedsilo-peers")["spec"]
    assert peers["clusterIP"] == "None" and peers["publishNotReadyAddresses"] is True
    assert peers["selector"] == selector and peers["ports"][0]["targetPort"] == "https"
    netpol = one(docs, "NetworkPolicy", "fedsilo")["spec"]
    to_peers = {"podSelector": {"matchLabels": selector}}
    assert any(r["from"] == [to_peers] for r in netpol["ingress"]), "replicas must accept each other's requests"
    assert any(r.get("to") == [to_peers] for r in netpol["egress"]), "replicas must reach each other"


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


# ------------------------------------------------------------------------------------------- several replicas
HA_VALUES = CHARTS / "aggregator" / "ci" / "ha-values.yaml"
NOT_SHARED = [  # what several replicas cannot share: (values, the schema's complaint, the template's reason)
    (("database.existingSecret=",), "/database/existingSecret",
     "replicaCount is 2 but the state store is SQLite: more than one replica needs PostgreSQL"),
    (("blobs.s3.bucket=",), "/blobs/s3/bucket",
     "replicaCount is 2 but blobs are files: more than one replica needs S3 blobs"),
    (("persistence.existingClaim=fedsilo-aggregator-state",), "/persistence/existingClaim",
     "replicaCount is 2 but persistence.existingClaim is set"),
]


@pytest.mark.parametrize(("sets", "schema_path", "reason"), NOT_SHARED, ids=["sqlite", "file-blobs", "claim"])
def test_aggregator_chart_refuses_replicas_without_shared_state(sets: tuple[str, ...], schema_path: str,
                                                                reason: str) -> None:
    """values.schema.json refuses it first (`helm install` and `helm template` alike); behind it, the templates
    refuse it with the reason (a chart packaged without its schema, or --skip-schema-validation)."""
    error = template("aggregator", HA_VALUES, sets=sets, expect_error=True)
    assert schema_path in error and "allOf" in error, error
    error = template("aggregator", HA_VALUES, sets=sets, expect_error=True, skip_schema=True)
    assert reason in error, error


def test_aggregator_chart_refuses_two_replicas_on_the_single_replica_values() -> None:
    """The reference single-replica values (SQLite, files, its own broker) with replicaCount=2: both missing."""
    values = CHARTS / "aggregator" / "ci" / "sqlite-mosquitto-values.yaml"
    error = template("aggregator", values, sets=("replicaCount=2",), expect_error=True)
    assert "/database/existingSecret" in error and "/blobs/s3/bucket" in error, error
    error = template("aggregator", values, sets=("replicaCount=2",), expect_error=True, skip_schema=True)
    assert "more than one replica needs PostgreSQL (set database.existingSecret)" in error, error


def test_aggregator_chart_two_replicas_irsa_and_blob_settings() -> None:
    """The replicas reach S3 through the IRSA role annotated on their service account, with the bucket, prefix
    and KMS key from the values; three replicas get the same budget and spread as two."""
    docs = manifests("aggregator", HA_VALUES, sets=("replicaCount=3",))
    assert one(docs, "Deployment", "fedsilo")["spec"]["replicas"] == 3
    account = one(docs, "ServiceAccount", "fedsilo")["metadata"]["annotations"]
    assert account["eks.amazonaws.com/role-arn"] == "arn:aws:iam::123456789012:role/fedsilo-aggregator"
    text = one(docs, "ConfigMap", "fedsilo")["data"]["aggregator.yaml"]
    config = AggregatorConfig.model_validate(yaml.safe_load(text))
    assert config.blob_url == "s3://fedsilo-blobs-example/aggregator"
    assert config.blob_s3.kms_key_id == "arn:aws:kms:eu-central-1:123456789012:key/0a1b2c3d-4e5f-6789-abcd-ef0123456789"
    assert config.lease_ttl_s == 3.0
    assert one(docs, "PodDisruptionBudget", "fedsilo")["spec"]["maxUnavailable"] == 1
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "fedsilo-state"]


def test_the_advertised_name_is_covered_by_a_wildcard_certificate(tmp_path: Path) -> None:
    """A replica forwards to another's advertise_url over TLS with hostname checking (aggregator/forward.py):
    the dashed-IP name under the peers Service must match the SAN docs/deploy.md tells operators to issue,
    `*.fedsilo-peers.fedsilo.svc.cluster.local`, in a real handshake (and a name outside it must not)."""

    pki = Pki(tmp_path / "pki")
    pki.init()
    issued = pki.issue("aggregator", "aggregator", ["fedsilo.example", "*.fedsilo-peers.fedsilo.svc.cluster.local"])
    tls = TLSConfig(ca_file=pki.ca_cert, cert_file=issued.cert, key_file=issued.key)
    server_ctx = tls.server_context(require_client_cert=True)

    def handshake(name: str) -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            done = threading.Thread(target=lambda: _accept(listener, server_ctx), daemon=True)
            done.start()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    tls.client_context().wrap_socket(raw, server_hostname=name) as conn:
                assert conn.version() is not None
            done.join(10)

    handshake("10-10-3-17.fedsilo-peers.fedsilo.svc.cluster.local")
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake("10-10-3-17.other.fedsilo.svc.cluster.local")


def _accept(listener: socket.socket, ctx: ssl.SSLContext) -> None:
    conn, _ = listener.accept()
    try:
        with ctx.wrap_socket(conn, server_side=True):
            pass
    except (ssl.SSLError, OSError):  # the client refused the certificate: the test checks its side
        conn.close()
