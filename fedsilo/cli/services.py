"""`fedsilo demo`, `fedsilo aggregator ...` and `fedsilo agent ...`: the services and their example configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from federation import logs
from fedsilo.cli._root import exit_now, main


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("demo-output"), show_default=True,
              help="The demo's own directory: data splits, configs, logs, state and reports go there.")
@click.option("--job", "job_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Job file to run (default: examples/heart-disease.yaml); it may list only the four centers.")
@click.option("--secure", is_flag=True, default=False,
              help="Run the job with secure aggregation (secure_aggregation: true): sites upload masked updates and "
                   "the aggregator sees only their sum (docs/secure-aggregation.md).")
def demo(workdir: Path, job_file: Path | None, secure: bool) -> None:
    """Run a local federation of the four UCI heart-disease centers end to end.

    The heart-disease case of `fedsilo local`: the same workspace, processes and summary, on the UCI data split
    per center and the centers' example policies."""
    from fedsilo.demo import EXAMPLES, run_demo
    from fedsilo.summary import exit_code

    summary = run_demo(workdir, job_file or EXAMPLES / "heart-disease.yaml", secure=secure)
    sys.exit(exit_code(summary))


@main.group()
def aggregator() -> None:
    """The central aggregator service."""


@aggregator.command("serve")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Aggregator YAML config (defaults apply for everything left out).")
def aggregator_serve(config_path: Path | None) -> None:
    """Serve the API, run the round engine and expose /metrics. SIGTERM or SIGINT stops it cleanly."""
    from aggregator.auth import OperatorsFileError
    from aggregator.config import AggregatorConfig
    from aggregator.revocation import RevocationError
    from aggregator.service import serve
    from federation.yamlfile import ConfigFileError

    try:
        cfg = AggregatorConfig.load(config_path)
    except ConfigFileError as exc:
        raise click.ClickException(str(exc)) from None
    logs.configure(cfg.log_json, os.environ.get("FEDSILO_LOG_LEVEL", "INFO"))
    try:
        serve(cfg)
    except (RevocationError, OperatorsFileError) as exc:  # a bad CRL or operators file: one line, nothing started
        raise click.ClickException(str(exc)) from None
    exit_now(0)


@aggregator.command("example-config")
@click.option("--pki", default="pki", show_default=True, help="The PKI directory (`fedsilo certs init --dir`).")
@click.option("--port", type=int, default=8443, show_default=True, help="HTTPS port.")
@click.option("--broker", default="127.0.0.1:8883", show_default=True, help="The broker's host:port.")
def aggregator_example_config(pki: str, port: int, broker: str) -> None:
    """Print a commented aggregator config for a local layout: every key, set or at its default."""
    from fedsilo.configdoc import aggregator_example

    click.echo(aggregator_example(pki, port, broker), nl=False)


@main.group()
def agent() -> None:
    """The per-hospital agent daemon."""


@agent.command("run")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="Agent YAML config for this site.")
def agent_run(config_path: Path) -> None:
    """Connect to the broker and take part in the jobs this site accepts. SIGTERM or SIGINT stops it cleanly."""
    from agent.config import AgentConfig
    from agent.daemon import run_agent

    cfg = AgentConfig.load(config_path)
    logs.configure(cfg.log_json, os.environ.get("FEDSILO_LOG_LEVEL", "INFO"))
    run_agent(cfg)
    exit_now(0)


@agent.command("example-config")
@click.option("--site", required=True, help="The site's name (its certificate's CN).")
@click.option("--pki", default="pki", show_default=True, help="Where the site's certificate, key and the CA are.")
@click.option("--aggregator", "aggregator_url", default="https://127.0.0.1:8443", show_default=True,
              help="The aggregator's URL.")
@click.option("--broker", default="127.0.0.1:8883", show_default=True, help="The broker's host:port.")
def agent_example_config(site: str, pki: str, aggregator_url: str, broker: str) -> None:
    """Print a commented agent config for a local layout: every key, set or at its default."""
    from fedsilo.certs import CertError, check_site_name
    from fedsilo.configdoc import agent_example

    try:
        check_site_name(site)
    except CertError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(agent_example(site, pki, aggregator_url, broker), nl=False)
