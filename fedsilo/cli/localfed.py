"""`fedsilo local init|up|status|down` (a federation of your own CSVs on this machine) and `fedsilo broker config`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fedsilo.cli._root import main, workspace_option


@main.group("local")
def local_group() -> None:
    """A federation on this machine on your own CSVs: the real broker, mTLS, policies, DP and reports.

    \b
      fedsilo local init --data DIR --job job.yaml    # one CSV per site, named SITE.csv
      fedsilo local up                                # broker, aggregator, one agent per site, in the background
      source fedsilo-local/operator.env && fedsilo job submit job.yaml --wait
      fedsilo local status
      fedsilo local down
    """


@local_group.command("init")
@workspace_option
@click.option("--site", "pairs", multiple=True, metavar="SITE=FILE.csv",
              help="A site and its data file (repeatable); or give --data.")
@click.option("--data", "folder", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A folder with one CSV per site, named SITE.csv.")
@click.option("--job", "job_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The job to run (`fedsilo job init` proposes one): its columns, target and purpose shape each "
                   "site's policy.")
@click.option("--broker-port", type=click.IntRange(1, 65535), default=None,
              help="The broker's port (default: a free one).")
@click.option("--aggregator-port", type=click.IntRange(1, 65535), default=None,
              help="The aggregator's port (default: a free one).")
@click.option("--force", is_flag=True, help="Rewrite an existing workspace's policies and configs (PKI, state and "
                                            "reports are kept).")
def local_init(workspace: Path, pairs: tuple[str, ...], folder: Path | None, job_file: Path,
               broker_port: int | None, aggregator_port: int | None, force: bool) -> None:
    """Write a local federation's PKI, site policies, configs, broker config and ACL; print the policies."""
    from fedsilo.localinit import init_local, parse_sites, review

    files = parse_sites(pairs, folder)
    init = init_local(workspace, files, job_file, force=force, broker_port=broker_port,
                      aggregator_port=aggregator_port)
    ws, ports = init.workspace, init.manifest.ports
    click.echo(f"local federation of {len(files)} site(s) in {ws.root}:")
    click.echo(f"  PKI (CA, site/aggregator/broker/operator certificates, job-signing key): {ws.pki.root}")
    click.echo(f"  broker config and ACL: {ws.broker_dir / 'mosquitto.conf'}, {ws.acl_file} "
               f"(port {ports.broker})")
    click.echo(f"  aggregator config: {ws.aggregator_config} (port {ports.aggregator})")
    click.echo(f"  agent configs and policies: {ws.config_dir}/agent-SITE.yaml, policy-SITE.yaml")
    click.echo("review each site's policy (edit the file to change it):")
    for line in review(init):
        click.echo(f"  {line}")
    click.echo(f"next: fedsilo local up --workspace {workspace}")


@local_group.command("up")
@workspace_option
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="Seconds to wait for every site to come online.")
def local_up(workspace: Path, timeout: float) -> None:
    """Start the broker, the aggregator and one agent per site in the background; print endpoints and credentials."""
    from fedsilo.local import LocalFederation

    fed = LocalFederation.open(workspace, detach=True)
    fed.start(timeout)
    ws = fed.workspace
    pids = {r.name: r.pid for r in fed.running()}
    click.echo(f"local federation up in {ws.root}:")
    click.echo(f"  broker      mqtts://127.0.0.1:{fed.broker.port} (mosquitto pid {pids.get('broker')}, mTLS, "
               f"ACL {ws.acl_file})")
    click.echo(f"  aggregator  {fed.url} (pid {pids.get('aggregator')}; console {fed.url}/console/)")
    for site in fed.sites:
        click.echo(f"  agent       {site:<16} online (pid {pids.get('agent-' + site)}, policy "
                   f"{ws.policy_file(site)})")
    click.echo(f"  logs        {ws.logs_dir}")
    click.echo(f"operator credentials (also in {ws.operator_env}):")
    for k, v in ws.operator_exports(fed.manifest).items():
        click.echo(f"  export {k}={v}")
    admin = fed.tokens.get("ops-admin")
    if admin is not None:
        click.echo(f"console sign-in token (admin): {admin[1]} (kept in {ws.tokens_file})")
    job = f" {fed.manifest.job_file}" if fed.manifest.job_file else " JOB.yaml"
    click.echo(f"next: source {ws.operator_env} && fedsilo job submit{job} --wait")


@local_group.command("status")
@workspace_option
def local_status(workspace: Path) -> None:
    """Show each process of the local federation and each site as the aggregator sees it."""
    from fedsilo.client import ClientError
    from fedsilo.local import LocalFederation
    from fedsilo.summary import ago

    fed = LocalFederation.open(workspace)
    alive = {r.name: r.pid for r in fed.running()}
    names = ["broker", "aggregator", *(f"agent-{s}" for s in fed.sites)]
    click.echo(f"local federation in {fed.workdir}:")
    for name in names:
        state = f"running (pid {alive[name]})" if name in alive else "stopped"
        click.echo(f"  {name:<24} {state}")
    if "aggregator" not in alive:
        click.echo("sites: unknown while the aggregator is stopped (`fedsilo local up`)")
        return
    try:
        rows = {s["site"]: s for s in fed.client.sites()}
        jobs = fed.client.jobs()
    except ClientError as exc:
        click.echo(f"sites: {exc}")
        return
    click.echo("sites (as the aggregator sees them):")
    for site in fed.sites:
        s = rows.get(site)
        if s is None:
            click.echo(f"  {site:<24} never connected")
        else:
            active = ", ".join(s.get("active_jobs") or []) or "no active job"
            click.echo(f"  {site:<24} {s['state']:<8} last seen {ago(s.get('at'))}; {active}")
    click.echo(f"jobs: {len(jobs)}" + "".join(f"\n  {j['job_id']:<40} {j['state']:<10} round {j['round']}/{j['rounds']}"
                                          for j in jobs[:10]))


@local_group.command("down")
@workspace_option
@click.option("--grace", type=float, default=5.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL.")
def local_down(workspace: Path, grace: float) -> None:
    """Stop the agents, the aggregator and the broker (SIGTERM, then SIGKILL after the grace); keep the workspace."""
    from fedsilo.local import LocalFederation
    from fedsilo.workspace import LocalError

    fed = LocalFederation.open(workspace)
    if not fed.running():
        raise LocalError(f"nothing is running in {fed.workdir} (`fedsilo local up` starts it)")
    for s in fed.stop(grace):
        how = "" if s.how == "SIGTERM" else f" ({s.how}: it did not stop within {grace:g}s)"
        click.echo(f"stopped {s.name:<24} pid {s.pid:<8} in {s.seconds:.2f}s{how}")
    click.echo(f"the workspace {fed.workdir} is kept: `fedsilo local up` starts it again")


@main.group("broker")
def broker_group() -> None:
    """The MQTT broker's files."""


@broker_group.command("config")
@click.option("--sites", required=True, help="The federation's sites, comma-separated.")
@click.option("--port", type=click.IntRange(1, 65535), default=8883, show_default=True)
@click.option("--host", default="0.0.0.0", show_default=True, help="The address the listener binds.")
@click.option("--dir", "pki_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("pki"),
              show_default=True, help="The PKI directory (its broker certificate and the CA are used).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("broker"), show_default=True,
              help="Where mosquitto.conf, acl and Mosquitto's persistence go.")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def broker_config(sites: str, port: int, host: str, pki_dir: Path, out: Path, force: bool) -> None:
    """Write mosquitto.conf (mutual TLS, certificate CN as username) and the per-site ACL.

    Mosquitto runs as the owner of the broker's key (the config's `user`): started by that user, or by root, it
    reads the 0600 key as its owner. Start it with `mosquitto -c OUT/mosquitto.conf`."""
    from fedsilo.broker import BrokerError, BrokerTLS, acl_for, mosquitto_config, run_as
    from fedsilo.certs import CertError, Pki, check_site_name

    names = [s.strip() for s in sites.split(",") if s.strip()]
    try:
        for name in names:
            check_site_name(name)
    except CertError as exc:
        raise click.ClickException(str(exc)) from None
    if not names:
        raise click.ClickException("name the sites: --sites SITE,SITE,...")
    pki = Pki(pki_dir.resolve())
    issued = pki.issued("broker", "broker")
    if not (pki.ca_cert.exists() and issued.cert.exists() and issued.key.exists()):
        raise click.ClickException(f"no broker certificate in {pki_dir}: run `fedsilo certs init --dir {pki_dir}` and "
                                   f"`fedsilo certs issue-broker --host HOST --dir {pki_dir}` first")
    out = out.resolve()
    conf, acl = out / "mosquitto.conf", out / "acl"
    existing = [str(p) for p in (conf, acl) if p.exists()]
    if existing and not force:
        raise click.ClickException(f"{', '.join(existing)} exist(s); pass --force to overwrite")
    try:
        crl = pki.ensure_crl()  # a PKI directory from before revocation gets its (empty) CRL here
        tls = BrokerTLS(pki.ca_cert, issued.cert, issued.key, crlfile=crl)
        user = run_as(issued.key)
        acl_text = acl_for(names)
    except (BrokerError, CertError) as exc:
        raise click.ClickException(str(exc)) from None
    out.mkdir(parents=True, exist_ok=True)
    acl.write_text(acl_text)
    conf.write_text(mosquitto_config(host=host, port=port, persistence_dir=out, log_dest="stdout", tls=tls,
                                     acl_file=acl, run_as=user))
    click.echo(f"wrote {conf} and {acl} ({len(names)} site(s); Mosquitto runs as {user}, the owner of {issued.key})")
    if crl is None:
        click.echo(f"no CRL in {pki_dir} and no CA key to sign one: the broker checks no revocations (copy crl.pem "
                   "there from the CA's PKI directory and run this again)")
    else:
        click.echo(f"revocations: {crl} (restart the broker after `fedsilo certs revoke`)")
    click.echo(f"start it with: mosquitto -c {conf}")
    sys.stdout.flush()
