"""The `fedsilo` command: one entry point for the demo, the services and the operator's tasks."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from federation import logs

if TYPE_CHECKING:
    from fedsilo.client import AggregatorClient


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Cross-silo federated learning for hospitals: raw data never leaves a site."""


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("demo-output"), show_default=True,
              help="Where data splits, configs, logs, state and reports go.")
@click.option("--job", "job_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Job file to run (default: examples/heart-disease.yaml).")
def demo(workdir: Path, job_file: Path | None) -> None:
    """Run a local federation of the four UCI heart-disease centers end to end."""
    from fedsilo.demo import EXAMPLES, run_demo

    summary = run_demo(workdir, job_file or EXAMPLES / "heart-disease.yaml")
    sys.exit(0 if summary["state"] == "finished" else 1)


@main.group()
def aggregator() -> None:
    """The central aggregator service."""


@aggregator.command("serve")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Aggregator YAML config (defaults apply for everything left out).")
def aggregator_serve(config_path: Path | None) -> None:
    """Serve the API, run the round engine and expose /metrics."""
    from aggregator.config import AggregatorConfig
    from aggregator.service import serve

    cfg = AggregatorConfig.load(config_path)
    logs.configure(cfg.log_json, os.environ.get("FEDSILO_LOG_LEVEL", "INFO"))
    serve(cfg)


@main.group()
def agent() -> None:
    """The per-hospital agent daemon."""


@agent.command("run")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="Agent YAML config for this site.")
def agent_run(config_path: Path) -> None:
    """Connect to the broker and take part in the jobs this site accepts."""
    from agent.config import AgentConfig
    from agent.daemon import run_agent

    cfg = AgentConfig.load(config_path)
    logs.configure(cfg.log_json, os.environ.get("FEDSILO_LOG_LEVEL", "INFO"))
    run_agent(cfg)


@main.group()
def job() -> None:
    """Submit and follow jobs."""


def _client_options(f: Callable[..., None]) -> Callable[..., None]:
    """The aggregator URL and the operator's TLS identity (env: FEDSILO_AGGREGATOR, FEDSILO_CA, ...)."""
    for opt in reversed([
        click.option("--aggregator", "url", envvar="FEDSILO_AGGREGATOR", default="https://127.0.0.1:8443",
                     show_default=True, help="Aggregator base URL."),
        click.option("--ca", envvar="FEDSILO_CA", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="CA certificate of the federation."),
        click.option("--cert", envvar="FEDSILO_CERT", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Operator client certificate."),
        click.option("--key", envvar="FEDSILO_KEY", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Operator client key."),
    ]):
        f = opt(f)
    return f


def _client(url: str, ca: Path | None, cert: Path | None, key: Path | None) -> AggregatorClient:
    from federation.transport import TLSConfig
    from fedsilo.client import AggregatorClient

    if ca is None:
        return AggregatorClient(url)
    return AggregatorClient(url, TLSConfig(ca_file=ca, cert_file=cert, key_file=key).client_context())


@job.command("submit")
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_client_options
@click.option("--wait/--no-wait", default=False, help="Follow the job with a live table until it ends.")
def job_submit(job_file: Path, url: str, ca: Path | None, cert: Path | None, key: Path | None, wait: bool) -> None:
    """Validate and submit a job file (YAML)."""
    from fedsilo.client import ApiError
    from fedsilo.progress import watch

    client = _client(url, ca, cert, key)
    try:
        job_id = client.submit(job_file.read_text())
    except ApiError as exc:
        for e in exc.body.get("errors", []):
            click.echo(f"  {e['field']}: {e['message']}", err=True)
        raise click.ClickException(str(exc) if not exc.body.get("errors") else "the job is invalid") from None
    click.echo(job_id)
    if wait:
        summary = watch(client, job_id)
        sys.exit(0 if summary["state"] == "finished" else 1)


@job.command("status")
@click.argument("job_id")
@_client_options
def job_status(job_id: str, url: str, ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """Print a job's state and per-round metrics as JSON."""
    click.echo(json.dumps(_client(url, ca, cert, key).job(job_id), indent=2))


@job.command("watch")
@click.argument("job_id")
@_client_options
def job_watch(job_id: str, url: str, ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """Follow a job with a live per-round table until it ends."""
    from fedsilo.progress import watch

    watch(_client(url, ca, cert, key), job_id)


@job.command("list")
@_client_options
def job_list(url: str, ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """List jobs."""
    for j in _client(url, ca, cert, key).jobs():
        click.echo(f"{j['job_id']:<40} {j['state']:<10} round {j['round']}/{j['rounds']} {j['reason']}")


@job.command("pause")
@click.argument("job_id")
@_client_options
def job_pause(job_id: str, url: str, ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """Let the current round finish, then hold the job until it is resumed."""
    click.echo(json.dumps(_client(url, ca, cert, key).pause(job_id)))


@job.command("resume")
@click.argument("job_id")
@_client_options
def job_resume(job_id: str, url: str, ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """Resume a paused job."""
    click.echo(json.dumps(_client(url, ca, cert, key).resume(job_id)))


@job.command("cancel")
@click.argument("job_id")
@_client_options
def job_cancel(job_id: str, url: str, ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """Cancel a running job."""
    click.echo(json.dumps(_client(url, ca, cert, key).cancel(job_id)))


@job.command("import-fedml")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--sites", "sites", multiple=True,
              help="Site names, comma-separated or repeated (default: site-1..site-N from client_num_in_total).")
@click.option("--template", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="fedsilo job giving what FedML's config lacks: features, privacy, purpose "
                   "(default: examples/heart-disease.yaml).")
@click.option("--name", default=None, help="Job name (default: <dataset>-<model>).")
@click.option("--trainer", default=None, help="A trainer the sites registered in their policies (their FedML "
                                              "ClientTrainer).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the job here (default: standard output; the mapping then goes to standard error).")
def job_import_fedml(config_file: Path, sites: tuple[str, ...], template: Path | None, name: str | None,
                     trainer: str | None, out: Path | None) -> None:
    """Convert a FedML Octopus fedml_config.yaml into a fedsilo job, printing what maps to what."""
    from fedsilo.fedml_import import FedMLImportError, import_fedml

    names = [s.strip() for group in sites for s in group.split(",") if s.strip()]
    try:
        result = import_fedml(config_file, names or None, template, name, trainer)
    except FedMLImportError as exc:
        raise click.ClickException(str(exc)) from None
    to_err = out is None
    for line in result.lines:
        click.echo(line.render(), err=to_err)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    text = result.job_yaml(str(config_file))
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text)
        click.echo(f"wrote {out} (a valid fedsilo job: check it with `fedsilo policy explain POLICY {out}`)")


@main.command("report")
@click.argument("job_id")
@click.option("--config", "config_path", envvar="FEDSILO_AGGREGATOR_CONFIG",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The aggregator's YAML config: its state, blobs and report directory are read (env: "
                   "FEDSILO_AGGREGATOR_CONFIG).")
def report(job_id: str, config_path: Path | None) -> None:
    """Regenerate a job's report (HTML, plots, CSV/JSON, tracking files) from the aggregator's state."""
    from aggregator.config import AggregatorConfig
    from aggregator.report import regenerate

    try:
        out = regenerate(AggregatorConfig.load(config_path), job_id)
    except KeyError:
        raise click.ClickException(f"no job {job_id!r} in the aggregator's state (see --config)") from None
    click.echo(out / "report.html")


@main.group()
def data() -> None:
    """Data preparation."""


@data.command("split")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def data_split(out: Path) -> None:
    """Write the UCI heart-disease data as one CSV per center (as each hospital would hold it)."""
    from fedsilo.datasets import split_by_center

    for site, path in split_by_center(out).items():
        click.echo(f"{site}: {path}")


@main.group()
def certs() -> None:
    """The federation's PKI: CA, certificates, job-signing key (files are written with mode 0600)."""


_pki_dir = click.option("--dir", "root", type=click.Path(file_okay=False, path_type=Path), default=Path("pki"),
                        show_default=True, help="PKI directory.")
_force = click.option("--force", is_flag=True, help="Overwrite existing files.")


@certs.command("init")
@_pki_dir
@_force
def certs_init(root: Path, force: bool) -> None:
    """Create the federation CA and the aggregator's Ed25519 job-signing key."""
    from fedsilo.certs import CertError, Pki

    pki = Pki(root)
    try:
        pki.init(force=force)
    except CertError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"CA: {pki.ca_cert}\njob-signing key: {pki.signing_key} (public: {pki.signing_pub})")


def _issue(root: Path, role: str, name: str, hosts: list[str], force: bool) -> None:
    from fedsilo.certs import CertError, Pki

    try:
        issued = Pki(root).issue(role, name, hosts or None, force=force)
    except CertError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{role} {name}: {issued.cert} {issued.key}")


@certs.command("issue-site")
@click.argument("name")
@_pki_dir
@_force
def certs_issue_site(name: str, root: Path, force: bool) -> None:
    """Issue a hospital's client certificate (its identity at the broker and the aggregator)."""
    _issue(root, "site", name, [], force)


@certs.command("issue-aggregator")
@click.option("--host", "hosts", multiple=True, help="DNS name or IP the aggregator is reached at (repeatable).")
@_pki_dir
@_force
def certs_issue_aggregator(hosts: tuple[str, ...], root: Path, force: bool) -> None:
    """Issue the aggregator's certificate (HTTPS server, and its identity at the broker)."""
    _issue(root, "aggregator", "aggregator", list(hosts), force)


@certs.command("issue-broker")
@click.option("--host", "hosts", multiple=True, help="DNS name or IP the broker is reached at (repeatable).")
@_pki_dir
@_force
def certs_issue_broker(hosts: tuple[str, ...], root: Path, force: bool) -> None:
    """Issue the MQTT broker's server certificate."""
    _issue(root, "broker", "broker", list(hosts), force)


@certs.command("issue-operator")
@click.argument("name")
@_pki_dir
@_force
def certs_issue_operator(name: str, root: Path, force: bool) -> None:
    """Issue an operator's client certificate (submits and manages jobs)."""
    _issue(root, "operator", name, [], force)


@main.group("operator")
def operator_group() -> None:
    """Operator access to the aggregator's API and console."""


@operator_group.command("token")
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "admin"]), default="viewer", show_default=True)
def operator_token(name: str, role: str) -> None:
    """Create a bearer token; put the printed entry under `operators:` in the aggregator's config."""
    from aggregator.auth import new_token

    token, digest = new_token()
    click.echo(f"token (give it to {name}; it is shown once): {token}")
    click.echo("aggregator config entry:")
    click.echo(f"  - {{name: {name}, role: {role}, token_sha256: {digest}}}")


@main.group()
def policy() -> None:
    """Site policies: validate, explain, export the schema."""


@policy.command("check")
@click.argument("policy_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def policy_check(policy_file: Path) -> None:
    """Validate a site policy and print what it allows in plain words."""
    from pydantic import ValidationError

    from agent.policy import SitePolicy, describe

    try:
        p = SitePolicy.load(policy_file)
    except (ValidationError, ValueError) as exc:
        raise click.ClickException(f"{policy_file} is not a valid policy:\n{exc}") from None
    for line in describe(p):
        click.echo(line)


@policy.command("explain")
@click.argument("policy_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--spent", type=float, default=0.0, show_default=True,
              help="ε already spent on the dataset, in the job's unit.")
def policy_explain(policy_file: Path, job_file: Path, spent: float) -> None:
    """Say whether a job would be accepted under a policy and, if not, every reason."""
    from agent.daemon import load_data
    from agent.policy import SitePolicy, evaluate
    from federation.jobs import JobSpec

    p = SitePolicy.load(policy_file)
    spec = JobSpec.from_yaml(job_file.read_text())
    decision, _ = evaluate(p, spec, p.site, endpoints=[], spent={spec.privacy.unit: spent}, active_jobs=0,
                           load=load_data)
    eps = "none (no noise)" if decision.epsilon_planned is None else \
        f"{decision.epsilon_planned:.2f} {spec.privacy.unit_words}"
    if decision.accepted:
        click.echo(f"ACCEPT: {p.site} would run {spec.name!r}; projected ε {eps}, "
                   f"budget use {decision.epsilon_before:.2f} → {decision.epsilon_after:.2f}")
        return
    click.echo(f"REFUSE: {p.site} would refuse {spec.name!r} (projected ε {eps}):")
    for reason in decision.reasons:
        click.echo(f"  - {reason}")
    sys.exit(1)


@policy.command("schema")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("policies/schema.json"),
              show_default=True)
def policy_schema(out: Path) -> None:
    """Write the policy's JSON Schema."""
    from agent.policy import policy_json_schema

    out.write_text(policy_json_schema())
    click.echo(str(out))


@main.group()
def audit() -> None:
    """The agent's hash-chained audit log."""


@audit.command("verify")
@click.argument("log_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--state", "state_db", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The agent's agent.db, to also detect entries cut off the end.")
def audit_verify(log_file: Path, state_db: Path | None) -> None:
    """Verify the chain: any edited, reordered or deleted entry is reported."""
    from agent.audit import verify
    from agent.state import AgentState

    head = AgentState(state_db).audit_head() if state_db else None
    result = verify(log_file, head)
    if result.ok:
        click.echo(f"OK: {result.entries} entries, chain intact")
        return
    click.echo(f"TAMPERED: {len(result.problems)} problem(s) in {result.entries} entries", err=True)
    for p in result.problems:
        click.echo(f"  - {p}", err=True)
    sys.exit(1)
