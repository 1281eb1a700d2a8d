"""The Terraform under deploy/terraform, checked offline: `terraform init` cannot fetch providers or modules
here, so every file is parsed with python-hcl2; every variable and output must be documented, every registry
module pinned to one exact version and every provider constrained. `terraform fmt -check` runs where a
terraform binary exists (`terraform validate` needs `init`, hence network access: see the README)."""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path
from typing import Any

import hcl2
import pytest

from aggregator.blobs_s3 import KIND_TAG
from tests.deploy._tools import TERRAFORM, optional_tool

EXACT_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
CONFIGURATIONS = [TERRAFORM, TERRAFORM / "agent-release"]


def clean(value: Any) -> Any:
    """python-hcl2 8 keeps string quotes and marks blocks with `__is_block__`: plain values instead."""
    if isinstance(value, dict):
        return {str(k).strip('"'): clean(v) for k, v in value.items() if not str(k).startswith("__")}
    if isinstance(value, list):
        return [clean(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


@functools.cache  # every test reads the same files
def parsed(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    files = sorted(directory.glob("*.tf"))
    assert files, f"no Terraform files in {directory}"
    out = []
    for f in files:
        with f.open() as fh:
            out.append((f, clean(hcl2.load(fh))))
    return out


def blocks(directory: Path, kind: str) -> dict[str, dict[str, Any]]:
    """Named blocks of one kind (variable, output, module) across a configuration's files."""
    found: dict[str, dict[str, Any]] = {}
    for path, doc in parsed(directory):
        for entry in doc.get(kind, []):
            for name, body in entry.items():
                assert name not in found, f"{kind} {name} declared twice ({path.name})"
                found[name] = body
    return found


@pytest.mark.parametrize("directory", CONFIGURATIONS, ids=lambda p: p.name)
def test_variables_and_outputs_are_documented(directory: Path) -> None:
    variables, outputs = blocks(directory, "variable"), blocks(directory, "output")
    assert variables and outputs
    for kind, items in (("variable", variables), ("output", outputs)):
        for name, body in items.items():
            description = str(body.get("description", ""))
            assert len(description.split()) >= 3, f"{kind} {name} has no description"
    for name, body in variables.items():
        assert "type" in body, f"variable {name} has no type"


@pytest.mark.parametrize("directory", CONFIGURATIONS, ids=lambda p: p.name)
def test_modules_and_providers_are_pinned(directory: Path) -> None:
    for name, body in blocks(directory, "module").items():
        source = str(body["source"])
        if source.startswith(("./", "../")):
            continue
        assert source.startswith("terraform-aws-modules/"), f"module {name}: {source} is not a maintained module"
        version = str(body.get("version", ""))
        assert EXACT_VERSION.match(version), f"module {name} ({source}) is not pinned to one version: {version!r}"
    required = [p for _, doc in parsed(directory) for t in doc.get("terraform", [])
                for p in t.get("required_providers", [])]
    assert required, "no required_providers block"
    for providers in required:
        for name, spec in providers.items():
            assert spec.get("version"), f"provider {name} has no version constraint"


def test_reference_topology() -> None:
    variables = blocks(TERRAFORM, "variable")
    assert variables["hospitals"]["default"] == ["cleveland", "hungary", "switzerland", "va-long-beach"]
    modules = blocks(TERRAFORM, "module")
    assert {"aggregator_vpc", "aggregator_eks", "hospital_vpc", "hospital_eks", "aggregator_irsa"} <= set(modules)
    for per_hospital in ("hospital_vpc", "hospital_eks"):
        assert "for_each" in modules[per_hospital], f"{per_hospital} must exist once per hospital"
    assert modules["hospital_eks"]["enable_irsa"] is False, "agents get no AWS role"
    resources: dict[str, set[str]] = {}
    for _, doc in parsed(TERRAFORM):
        for entry in doc.get("resource", []):
            for kind, named in entry.items():
                resources.setdefault(kind, set()).update(named)
    for kind in ("aws_s3_bucket", "aws_s3_bucket_versioning", "aws_s3_bucket_server_side_encryption_configuration",
                 "aws_s3_bucket_public_access_block", "helm_release"):
        assert kind in resources, f"no {kind}"
    agent_release = [doc for _, doc in parsed(TERRAFORM / "agent-release")]
    assert any("helm_release" in entry for doc in agent_release for entry in doc.get("resource", []))


def named(directory: Path, section: str, kind: str) -> dict[str, dict[str, Any]]:
    """Every `section "kind" "name"` block (resource, data) of a configuration, by name."""
    return {name: body for _, doc in parsed(directory) for entry in doc.get(section, [])
            for name, body in entry.get(kind, {}).items()}


def test_blob_bucket() -> None:
    """The aggregator's blob bucket (deploy/terraform/blobs.tf): its own KMS key, ACLs off, versioned, public
    access blocked, TLS only, written once; round updates expire by the tag the S3 blob store sets, models never;
    the IRSA policy reaches that bucket's prefix and key only; the Helm release gets its blob_url from here."""
    def one(kind: str, name: str = "blobs") -> dict[str, Any]:
        return named(TERRAFORM, "resource", kind)[name]

    assert one("aws_kms_key")["enable_key_rotation"] is True
    assert one("aws_s3_bucket_ownership_controls")["rule"][0]["object_ownership"] == "BucketOwnerEnforced"
    assert one("aws_s3_bucket_versioning")["versioning_configuration"][0]["status"] == "Enabled"
    (rule,) = one("aws_s3_bucket_server_side_encryption_configuration")["rule"]
    (sse,) = rule["apply_server_side_encryption_by_default"]
    assert sse == {"sse_algorithm": "aws:kms", "kms_master_key_id": "${aws_kms_key.blobs.arn}"}
    access = one("aws_s3_bucket_public_access_block")
    assert all(access[k] is True for k in ("block_public_acls", "block_public_policy", "ignore_public_acls",
                                           "restrict_public_buckets"))

    rules = {r["id"]: r for r in one("aws_s3_bucket_lifecycle_configuration")["rule"]}
    updates = rules["expire-round-updates"]
    assert updates["filter"] == [{"tag": [{"key": KIND_TAG, "value": "update"}]}], "only updates expire"
    assert updates["expiration"] == [{"days": "${var.blob_update_retention_days}"}]
    assert not any("model" in str(r.get("filter")) for r in rules.values()), "no rule may expire models"
    purge = rules["purge-noncurrent-versions"]
    assert purge["noncurrent_version_expiration"] == [{"noncurrent_days": "${var.blob_noncurrent_days}"}]
    variables = blocks(TERRAFORM, "variable")
    assert variables["blob_update_retention_days"]["default"] >= 7
    assert "validation" in variables["blob_update_retention_days"]

    documents = named(TERRAFORM, "data", "aws_iam_policy_document")
    assert one("aws_s3_bucket_policy")["policy"] == "${data.aws_iam_policy_document.blobs_bucket.json}"
    bucket_policy = {s["sid"]: s for s in documents["blobs_bucket"]["statement"]}
    tls, once = bucket_policy["TLSOnly"], bucket_policy["WriteOnce"]
    assert tls["effect"] == "Deny" and tls["condition"][0]["variable"] == "aws:SecureTransport"
    assert once["effect"] == "Deny" and once["actions"] == ["s3:PutObject"]
    assert once["condition"] == [{"test": "Null", "variable": "s3:if-none-match", "values": ["true"]}]

    grants = documents["aggregator_blobs"]["statement"]
    actions = {a for s in grants for a in s["actions"]}
    assert actions == {"s3:GetObject", "s3:PutObject", "s3:PutObjectTagging", "s3:ListBucket",
                       "kms:GenerateDataKey", "kms:Decrypt"}, "least privilege: no delete, no other bucket"
    resources = {r for s in grants for r in s["resources"]}
    assert resources == {"${aws_s3_bucket.blobs.arn}/${var.blob_prefix}/*", "${aws_s3_bucket.blobs.arn}",
                         "${aws_kms_key.blobs.arn}"}
    irsa = blocks(TERRAFORM, "module")["aggregator_irsa"]
    assert "${aws_iam_policy.aggregator_blobs.arn}" in irsa["role_policy_arns"].values()

    values = str(one("helm_release", "aggregator")["values"])
    for wired in ("bucket = aws_s3_bucket.blobs.id", "prefix = var.blob_prefix", "kmsKeyId = aws_kms_key.blobs.arn"):
        assert wired in values, f"the aggregator's release does not get {wired}"
    assert blocks(TERRAFORM, "output")["blob_url"]["value"] == "s3://${aws_s3_bucket.blobs.id}/${var.blob_prefix}"


def test_files_follow_terraform_fmt_layout() -> None:
    """The layout rules of `terraform fmt` that need no binary (two-space indents, no tabs or trailing blanks,
    aligned `=` is left to fmt), always; `terraform fmt -check` itself too where a terraform binary exists."""
    files = sorted(TERRAFORM.rglob("*.tf"))
    assert files
    for f in files:
        text = f.read_text()
        assert text.endswith("\n") and not text.endswith("\n\n"), f"{f.name}: must end with exactly one newline"
        for n, line in enumerate(text.splitlines(), 1):
            assert "\t" not in line, f"{f.name}:{n}: tab"
            assert line == line.rstrip(), f"{f.name}:{n}: trailing whitespace"
            indent = len(line) - len(line.lstrip(" "))
            assert indent % 2 == 0, f"{f.name}:{n}: indentation of {indent} spaces (fmt uses steps of two)"
    terraform = optional_tool("terraform")
    if terraform is not None:
        proc = subprocess.run([str(terraform), "fmt", "-check", "-recursive", "-diff", str(TERRAFORM)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"terraform fmt would change:\n{proc.stdout}{proc.stderr}"


def test_database() -> None:
    """The aggregator's RDS PostgreSQL (deploy/terraform/database.tf): encrypted with a key of its own, never
    public, in the VPC's database subnets, reachable on 5432 from the aggregator cluster's nodes only, TLS only,
    backed up, Multi-AZ and deletion protection on by default and configurable, its password generated."""
    db = named(TERRAFORM, "resource", "aws_db_instance")["aggregator"]
    assert db["engine"] == "postgres"
    assert db["storage_encrypted"] is True and db["kms_key_id"] == "${aws_kms_key.database.arn}"
    assert db["publicly_accessible"] is False
    assert db["db_subnet_group_name"] == "${module.aggregator_vpc.database_subnet_group_name}"
    assert db["vpc_security_group_ids"] == ["${aws_security_group.database.id}"]
    assert db["password"] == "${random_password.database.result}", "the password is generated, never written"
    assert db["multi_az"] == "${var.database_multi_az}"
    assert db["deletion_protection"] == "${var.database_deletion_protection}"
    assert db["backup_retention_period"] == "${var.database_backup_retention_days}"
    assert db["skip_final_snapshot"] is False and db["copy_tags_to_snapshot"] is True
    variables = blocks(TERRAFORM, "variable")
    assert variables["database_multi_az"]["default"] is True
    assert variables["database_deletion_protection"]["default"] is True
    assert variables["database_backup_retention_days"]["default"] >= 7
    assert "validation" in variables["database_backup_retention_days"]
    assert named(TERRAFORM, "resource", "aws_kms_key")["database"]["enable_key_rotation"] is True

    vpc = blocks(TERRAFORM, "module")["aggregator_vpc"]
    assert vpc["database_subnets"] and vpc["create_database_subnet_group"] is True
    group = named(TERRAFORM, "resource", "aws_security_group")["database"]
    assert "ingress" not in group and "egress" not in group, "rules are the separate resources below, only"
    rules = named(TERRAFORM, "resource", "aws_vpc_security_group_ingress_rule")
    assert rules == {"database_from_nodes": {
        "security_group_id": "${aws_security_group.database.id}",
        "description": rules["database_from_nodes"]["description"],
        "referenced_security_group_id": "${module.aggregator_eks.node_security_group_id}",
        "ip_protocol": "tcp", "from_port": 5432, "to_port": 5432}}, "5432 from the cluster's nodes, nothing else"
    assert not named(TERRAFORM, "resource", "aws_vpc_security_group_egress_rule")
    parameters = {p["name"]: p["value"] for p in named(TERRAFORM, "resource", "aws_db_parameter_group")["database"]
                  ["parameter"]}
    assert parameters["rds.force_ssl"] == "1"
    assert db["parameter_group_name"] == "${aws_db_parameter_group.database.name}"


def test_database_and_blobs_are_wired_into_the_helm_release() -> None:
    """The release runs aggregator_replicas (default 2) replicas on the RDS database, whose URL reaches the pods
    in a Kubernetes Secret only (never a Helm value), on the blob bucket and its key, through the IRSA role whose
    service account is the chart's."""
    release = named(TERRAFORM, "resource", "helm_release")["aggregator"]
    values = str(release["values"])
    for wired in ("replicaCount = var.aggregator_replicas",
                  'database = {existingSecret = kubernetes_secret_v1.database.metadata[0].name, key = "url"}',
                  "databaseCidrs = module.aggregator_vpc.database_subnets_cidr_blocks",
                  "databasePort = aws_db_instance.aggregator.port",
                  "serviceAccount = {roleArn = module.aggregator_irsa.iam_role_arn}",
                  "bucket = aws_s3_bucket.blobs.id", "kmsKeyId = aws_kms_key.blobs.arn"):
        assert wired in values, f"the aggregator's release does not get {wired}"
    for leak in ("random_password", "password", "aws_db_instance.aggregator.address", "postgresql://"):
        assert leak not in values, f"{leak} in the release's values: the URL goes through the Secret only"
    assert "set_sensitive" not in release and "set" not in release
    assert release["namespace"] == "${kubernetes_namespace_v1.fedsilo.metadata[0].name}"
    variables = blocks(TERRAFORM, "variable")
    assert variables["aggregator_replicas"]["default"] == 2

    secret = named(TERRAFORM, "resource", "kubernetes_secret_v1")["database"]
    (meta,) = secret["metadata"]
    assert meta["namespace"] == release["namespace"]
    assert secret["data"]["url"] == ("postgresql://fedsilo:${urlencode(random_password.database.result)}"
                                     "@${aws_db_instance.aggregator.address}:${aws_db_instance.aggregator.port}"
                                     "/fedsilo?sslmode=require")
    # The chart's service account (release "fedsilo": fullname "fedsilo") in that namespace assumes the role.
    (namespace,) = named(TERRAFORM, "resource", "kubernetes_namespace_v1")["fedsilo"]["metadata"]
    irsa = blocks(TERRAFORM, "module")["aggregator_irsa"]
    assert irsa["oidc_providers"]["aggregator"]["namespace_service_accounts"] == [
        f"{namespace['name']}:{release['name']}"]
