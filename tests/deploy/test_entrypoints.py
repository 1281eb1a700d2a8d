"""The images' commands start, installed the way the Dockerfiles install them, with the images' config files.

There is no Docker engine here, so this is the closest check to running the images: the project is built as a
wheel and installed, with torch==2.13.0 (CPU) and the `aws` extra, into a virtualenv of its own (not .venv);
then the Dockerfiles' own ENTRYPOINT + CMD run from it, with `deploy/config/*.yaml` and the image layout
(/etc/fedsilo, /var/fedsilo) mapped into a temporary root, against a real Mosquitto with TLS and the generated
ACL. The Dockerfiles' HEALTHCHECK commands must pass against the running services, the agent must become
ready, and the aggregator must see it online.

The virtualenv (`tests/deploy/image_venv.py`) gets its dependencies once per set of runtime requirements, at
`make install-test`; the project's wheel is rebuilt and reinstalled into it on every run.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from federation.transport import TLSConfig
from fedsilo.broker import BrokerTLS, MosquittoBroker, acl_for
from fedsilo.certs import Pki, local_pki
from fedsilo.client import AggregatorClient
from fedsilo.netutil import free_port
from tests.deploy import image_venv as image_venv_module
from tests.deploy._tools import DEPLOY, REPO, exec_form

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SITE = "cleveland"
STARTUP_S = 60.0


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a virtualenv holding the project as the images install it (wheel, CPU torch, `aws` extra)."""
    try:
        return image_venv_module.ensure(image_venv_module.build_wheel(tmp_path_factory.mktemp("wheels")))
    except image_venv_module.InstallError as exc:
        pytest.fail(str(exc), pytrace=False)


def _relocate(value: Any, root: Path) -> Any:
    """The image's absolute paths (also inside URLs) moved under `root`, as if `root` were the container's /."""
    if isinstance(value, dict):
        return {k: _relocate(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate(v, root) for v in value]
    if isinstance(value, str):
        for prefix in ("/etc/fedsilo", "/var/fedsilo", "/data"):
            if prefix in value and ("://" in value or value.startswith(prefix)):
                return value.replace(prefix, f"{root}{prefix}", 1)
    return value


def _container_root(root: Path, pki: Pki, role: str, name: str) -> None:
    """The mounts the Helm charts provide: TLS Secret, job-signing key, state volume."""
    issued = pki.issued(role, name)
    tls = root / "etc/fedsilo/tls"
    tls.mkdir(parents=True)
    shutil.copy(pki.ca_cert, tls / "ca.crt")
    shutil.copy(issued.cert, tls / "tls.crt")
    shutil.copy(issued.key, tls / "tls.key")
    (root / "etc/fedsilo/signing").mkdir(parents=True)
    (root / "etc/fedsilo/config").mkdir(parents=True)
    (root / "var/fedsilo" / ("agent" if role == "site" else "aggregator")).mkdir(parents=True)
    (root / "tmp").mkdir()


def _image_command(dockerfile: str, bin_dir: Path, root: Path) -> list[str]:
    cmd = exec_form(REPO / dockerfile, "ENTRYPOINT") + exec_form(REPO / dockerfile, "CMD")
    assert cmd[0] == "fedsilo"
    return [str(bin_dir / "fedsilo"), *_relocate(cmd[1:], root)]


def _config_path(command: list[str]) -> Path:
    return Path(command[command.index("--config") + 1])


def _healthcheck(dockerfile: str, bin_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = exec_form(REPO / dockerfile, "HEALTHCHECK")
    assert cmd[0] == "python"
    return subprocess.run([str(bin_dir / "python"), *cmd[1:]], env=env, capture_output=True, text=True, timeout=30)


def _wait(what: str, ok: Any, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while not ok():
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}", pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached in {STARTUP_S}s:\n{log.read_text()[-3000:]}", pytrace=False)
        time.sleep(0.2)


@pytest.fixture
def federation_pki(tmp_path: Path) -> Pki:
    return local_pki(tmp_path / "pki", [SITE])


@pytest.fixture
def tls_broker(tmp_path: Path, federation_pki: Pki) -> Iterator[MosquittoBroker]:
    acl = tmp_path / "broker.acl"
    acl.write_text(acl_for([SITE]))
    issued = federation_pki.issued("broker", "broker")
    b = MosquittoBroker(tmp_path / "broker", tls=BrokerTLS(federation_pki.ca_cert, issued.cert, issued.key),
                        acl_file=acl)
    b.start()
    yield b
    b.stop()


def _spawn(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.terminate()
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def test_image_commands_start_with_the_default_configs(
    image_venv: Path, tmp_path: Path, federation_pki: Pki, tls_broker: MosquittoBroker
) -> None:
    pki = federation_pki
    agg_root, agent_root = tmp_path / "aggregator-root", tmp_path / "agent-root"
    _container_root(agg_root, pki, "aggregator", "aggregator")
    _container_root(agent_root, pki, "site", SITE)
    shutil.copy(pki.signing_key, agg_root / "etc/fedsilo/signing/job-signing.key")
    shutil.copy(pki.signing_pub, agent_root / "etc/fedsilo/signing/job-signing.pub")
    agg_port, status_port = free_port(), free_port()

    # The images' environment (Dockerfile ENV), with HOME and TMPDIR in the scratch volume.
    base_env = {"PATH": f"{image_venv}:/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
                "FEDSILO_LOG_LEVEL": "INFO", "LANG": "C.UTF-8"}

    # --- aggregator: the image's command and its baked-in default config; only the endpoints are this machine's.
    agg_cmd = _image_command("Dockerfile.aggregator", image_venv, agg_root)
    agg_config = _relocate(yaml.safe_load((DEPLOY / "config" / "aggregator.yaml").read_text()), agg_root)
    agg_config.update(host="127.0.0.1", port=agg_port, broker={"host": tls_broker.host, "port": tls_broker.port})
    _config_path(agg_cmd).write_text(yaml.safe_dump(agg_config))
    agg_env = {**base_env, "HOME": str(agg_root / "tmp"), "TMPDIR": str(agg_root / "tmp"),
               "MPLCONFIGDIR": str(agg_root / "tmp" / "matplotlib"),
               "FEDSILO_HEALTHCHECK_URL": f"https://127.0.0.1:{agg_port}/healthz",
               "FEDSILO_HEALTHCHECK_CA": str(agg_root / "etc/fedsilo/tls/ca.crt")}
    agg_log = tmp_path / "aggregator.log"
    aggregator = _spawn(agg_cmd, agg_root / "var/fedsilo/aggregator", agg_env, agg_log)
    agent: subprocess.Popen[bytes] | None = None
    try:
        _wait("the aggregator image's HEALTHCHECK",
              lambda: _healthcheck("Dockerfile.aggregator", image_venv, agg_env).returncode == 0, aggregator, agg_log)

        # --- agent: the reference config and the site's example policy, endpoints pointed at this machine.
        agent_cmd = _image_command("Dockerfile.agent", image_venv, agent_root)
        broker_ep, agg_ep = f"{tls_broker.host}:{tls_broker.port}", f"127.0.0.1:{agg_port}"
        policy = yaml.safe_load((REPO / "policies" / "examples" / f"{SITE}.yaml").read_text())
        policy["egress"]["allowed_endpoints"] = [broker_ep, agg_ep]
        agent_config = _relocate(yaml.safe_load((DEPLOY / "config" / "agent.yaml").read_text()), agent_root)
        assert agent_config["site"] == SITE
        agent_config.update(broker={"host": tls_broker.host, "port": tls_broker.port},
                            aggregator_url=f"https://{agg_ep}", status_host="127.0.0.1", status_port=status_port)
        Path(agent_config["policy_file"]).write_text(yaml.safe_dump(policy))
        _config_path(agent_cmd).write_text(yaml.safe_dump(agent_config))
        agent_env = {**base_env, "HOME": str(agent_root / "tmp"), "TMPDIR": str(agent_root / "tmp"),
                     "FEDSILO_HEALTHCHECK_URL": f"http://127.0.0.1:{status_port}/healthz"}
        agent_log = tmp_path / "agent.log"
        agent = _spawn(agent_cmd, agent_root / "var/fedsilo/agent", agent_env, agent_log)

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/readyz", timeout=2) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        _wait("the agent's /readyz (connected to the broker)", ready, agent, agent_log)
        check = _healthcheck("Dockerfile.agent", image_venv, agent_env)
        assert check.returncode == 0, check.stderr

        operator = pki.issued("operator", "operator")
        client = AggregatorClient(f"https://{agg_ep}", TLSConfig(ca_file=pki.ca_cert, cert_file=operator.cert,
                                                                 key_file=operator.key).client_context())
        _wait("the site online at the aggregator",
              lambda: any(s["site"] == SITE and s["state"] == "online" for s in client.sites()), agent, agent_log)

        # Everything the services wrote is on their state volumes: the config mounts stay as they were.
        assert (agent_root / "var/fedsilo/agent/agent.db").exists()
        assert (agg_root / "var/fedsilo/aggregator/state.db").exists()
        for root in (agg_root, agent_root):
            written = {p.name for p in (root / "etc/fedsilo").rglob("*") if p.is_file()}
            assert written <= {"ca.crt", "tls.crt", "tls.key", "job-signing.key", "job-signing.pub",
                               "aggregator.yaml", "agent.yaml", "policy.yaml"}, written
    finally:
        if agent is not None:
            assert _stop(agent) == 0, (tmp_path / "agent.log").read_text()[-3000:]
        assert _stop(aggregator) == 0, agg_log.read_text()[-3000:]
