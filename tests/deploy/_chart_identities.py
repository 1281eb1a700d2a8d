"""What the aggregator chart renders for the CRL and the operators file (crl.existingSecret,
operatorsFile.existingSecret): each Secret mounted as a whole directory, read-only and never with subPath (the
kubelet refreshes a Secret's files in place only then), at the path the aggregator's config names; the CRL also
in the broker's mosquitto.conf and pod. Without the values, none of it."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from aggregator.config import AggregatorConfig
from tests.deploy._helm import one

# value -> (Secret key, the aggregator config's field, the volume's name)
AGGREGATOR_FILES = {"crl": ("crl.pem", "crl_file", "crl"),
                    "operatorsFile": ("operators.yaml", "operators_file", "operators")}
BROKER_CRL_DIR = PurePosixPath("/mosquitto/crl")


def secret_file(pod: dict[str, Any], container: dict[str, Any], path: PurePosixPath) -> tuple[str, str]:
    """The (Secret name, key) the container sees at `path`: its mount must hold the whole Secret volume
    (no subPath), read-only, with the key projected under the file's name."""
    mounts = [m for m in container["volumeMounts"] if PurePosixPath(m["mountPath"]) == path.parent]
    assert len(mounts) == 1, f"{container['name']}: {path} is in no mounted directory of its own ({mounts})"
    (mount,) = mounts
    assert "subPath" not in mount and "subPathExpr" not in mount, f"{mount}: a subPath mount is never refreshed"
    assert mount["readOnly"] is True, mount
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret = volume["secret"]
    (item,) = [i for i in secret["items"] if i["path"] == path.name]
    return secret["secretName"], item["key"]


def check_identity_files(docs: list[dict[str, Any]], given: dict[str, Any], config: AggregatorConfig) -> None:
    deployment = one(docs, "Deployment", "fedsilo")
    pod = deployment["spec"]["template"]["spec"]
    (agg,) = [c for c in pod["containers"] if c["name"] == "aggregator"]
    # The pods restart on a change of the rendered config only: nothing follows the Secrets' contents.
    assert set(deployment["spec"]["template"]["metadata"]["annotations"]) == {"checksum/config"}
    for value, (key, field, volume) in AGGREGATOR_FILES.items():
        secret = given.get(value, {}).get("existingSecret")
        path = getattr(config, field)
        if secret:
            assert path is not None, f"{value}.existingSecret is set but {field} is not"
            assert secret_file(pod, agg, PurePosixPath(str(path))) == (secret, key)
        else:
            assert path is None, f"{field} without {value}.existingSecret"
            assert volume not in {v["name"] for v in pod["volumes"]}
            assert volume not in {m["name"] for c in pod["containers"] for m in c["volumeMounts"]}

    if not given.get("mosquitto", {}).get("enabled", True):
        return
    conf = one(docs, "ConfigMap", "fedsilo-mosquitto")["data"]["mosquitto.conf"].splitlines()
    broker_pod = one(docs, "StatefulSet", "fedsilo-mosquitto")["spec"]["template"]["spec"]
    (mosquitto,) = broker_pod["containers"]
    crl = given.get("crl", {}).get("existingSecret")
    crlfiles = [line.split(" ", 1)[1] for line in conf if line.startswith("crlfile")]
    if crl:
        (crlfile,) = crlfiles
        # per_listener_settings: a TLS option counts only after its listener line.
        listener = next(i for i, line in enumerate(conf) if line.startswith("listener "))
        assert conf.index(f"crlfile {crlfile}") > listener, "crlfile before the listener line is ignored"
        assert PurePosixPath(crlfile).parent == BROKER_CRL_DIR
        assert secret_file(broker_pod, mosquitto, PurePosixPath(crlfile)) == (crl, "crl.pem")
    else:
        assert crlfiles == [] and "crl" not in {v["name"] for v in broker_pod["volumes"]}
        assert all(Path(m["mountPath"]) != Path(BROKER_CRL_DIR) for m in mosquitto["volumeMounts"])
