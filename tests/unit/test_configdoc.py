"""docs/configuration.md is generated from the pydantic models and must be current; the example configs are valid
configs with every key documented."""

from __future__ import annotations

import yaml
from click.testing import CliRunner

from agent.config import AgentConfig
from aggregator.config import AggregatorConfig
from fedsilo.cli import main
from fedsilo.configdoc import REFERENCE, field_doc, reference


def test_the_configuration_reference_is_current() -> None:
    assert REFERENCE.read_text() == reference(), (
        "docs/configuration.md is stale: regenerate it with `.venv/bin/python -m fedsilo.configdoc`")


def test_the_reference_documents_every_model_and_key() -> None:
    text = reference()
    for model in ("AgentConfig", "AggregatorConfig", "SitePolicy", "JobSpec", "PrivacySpec", "DatasetPolicy",
                  "TLSConfig", "BrokerConfig", "TrackingConfig"):
        assert f"\n### {model}\n" in text
    for name in AgentConfig.model_fields:
        assert f"| `{name}` |" in text
    # documentation comes from a field's description or, failing that, the comments beside it in the source
    assert field_doc(AgentConfig, "aggregator_public_key", AgentConfig.model_fields["aggregator_public_key"]) \
        .startswith("The aggregator's Ed25519 job-signing public key")
    assert "| `shutdown_grace_s` | number | `1.0` | On SIGTERM, how long requests in flight may take" in text


def test_agent_example_config_is_a_valid_commented_config() -> None:
    result = CliRunner().invoke(main, ["agent", "example-config", "--site", "north", "--pki", "/etc/fedsilo/pki"])
    assert result.exit_code == 0, result.output
    cfg = AgentConfig.model_validate(yaml.safe_load(result.output))
    assert cfg.site == "north" and str(cfg.tls.cert_file) == "/etc/fedsilo/pki/site/north.crt"
    assert "# The aggregator's Ed25519 job-signing public key" in result.output
    assert "# heartbeat_s: 10.0" in result.output  # every other key, at its default, commented out
    bad = CliRunner().invoke(main, ["agent", "example-config", "--site", "North Clinic"])
    assert bad.exit_code == 1 and "is not a valid site name" in bad.output


def test_aggregator_example_config_is_a_valid_commented_config() -> None:
    result = CliRunner().invoke(main, ["aggregator", "example-config", "--port", "9443", "--broker", "mq:8884"])
    assert result.exit_code == 0, result.output
    cfg = AggregatorConfig.model_validate(yaml.safe_load(result.output))
    assert (cfg.port, cfg.broker.host, cfg.broker.port) == (9443, "mq", 8884)
    assert cfg.tls is not None and cfg.signing_key is not None
    assert "# http_keepalive_s: 75.0" in result.output
