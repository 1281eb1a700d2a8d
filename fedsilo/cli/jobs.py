"""`fedsilo job ...`, `fedsilo sites` and `fedsilo report`: the operator's side of a federation."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from fedsilo.cli._root import client_options, main, make_client

_report_dir = click.option(
    "--report-dir", type=click.Path(file_okay=False, path_type=Path), envvar="FEDSILO_REPORT_DIR",
    help="Where the aggregator writes reports, when it shares this machine's disk (a local federation), to list "
         "the report's files (env: FEDSILO_REPORT_DIR).")
_timeout = click.option("--timeout", type=float, default=3600.0, show_default=True,
                        help="Stop following after this many seconds (exit code 2).")


@main.group()
def job() -> None:
    """Write, submit and follow jobs."""


def _follow(client: Any, job_id: str, url: str, report_dir: Path | None, timeout: float) -> None:
    from fedsilo.progress import watch
    from fedsilo.summary import exit_code, print_outcome

    summary = watch(client, job_id, timeout=timeout)
    print_outcome(summary, report_dir, aggregator=url)
    sys.exit(exit_code(summary))


def _unknown_sites(client: Any, text: str) -> list[str]:
    """The job's sites the aggregator has never heard from (they cannot answer its offer)."""
    import yaml

    try:
        sites = yaml.safe_load(text).get("sites") or []
    except (yaml.YAMLError, AttributeError):
        return []
    known = {s["site"] for s in client.sites()}
    return [s for s in sites if isinstance(s, str) and s not in known]


@job.command("submit")
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@client_options
@click.option("--wait/--no-wait", default=False,
              help="Follow the job until it ends, then print its outcome; the exit code is 0 only if it finished.")
@_report_dir
@_timeout
def job_submit(job_file: Path, url: str, ca: Path | None, cert: Path | None, key: Path | None, wait: bool,
               report_dir: Path | None, timeout: float) -> None:
    """Validate and submit a job file (YAML); print its id."""
    from fedsilo.client import ApiError

    client = make_client(url, ca, cert, key)
    text = job_file.read_text()
    try:
        job_id = client.submit(text)
    except ApiError as exc:
        for e in exc.body.get("errors", []):
            click.echo(f"  {e['field']}: {e['message']}", err=True)
        raise click.ClickException(str(exc) if not exc.body.get("errors") else f"{job_file}: the job is invalid") \
            from None
    click.echo(job_id)
    unknown = _unknown_sites(client, text)
    if unknown:
        click.echo(f"warning: the aggregator has never heard from site(s) {', '.join(unknown)}: they cannot answer "
                   "the offer, and the job starts without them (or fails) at its accept deadline", err=True)
    if wait:
        _follow(client, job_id, url, report_dir, timeout)


@job.command("status")
@click.argument("job_id")
@client_options
def job_status(job_id: str, url: str, ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """Print a job's state and per-round metrics as JSON."""
    click.echo(json.dumps(make_client(url, ca, cert, key).job(job_id), indent=2))


@job.command("watch")
@click.argument("job_id")
@client_options
@_report_dir
@_timeout
def job_watch(job_id: str, url: str, ca: Path | None, cert: Path | None, key: Path | None, report_dir: Path | None,
              timeout: float) -> None:
    """Follow a job until it ends, then print its outcome; the exit code is 0 only if it finished."""
    _follow(make_client(url, ca, cert, key), job_id, url, report_dir, timeout)


@job.command("list")
@client_options
def job_list(url: str, ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """List jobs."""
    for j in make_client(url, ca, cert, key).jobs():
        click.echo(f"{j['job_id']:<40} {j['state']:<10} round {j['round']}/{j['rounds']} {j['reason']}")


@job.command("pause")
@click.argument("job_id")
@client_options
def job_pause(job_id: str, url: str, ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """Let the current round finish, then hold the job until it is resumed."""
    click.echo(json.dumps(make_client(url, ca, cert, key).pause(job_id)))


@job.command("resume")
@click.argument("job_id")
@client_options
def job_resume(job_id: str, url: str, ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """Resume a paused job."""
    click.echo(json.dumps(make_client(url, ca, cert, key).resume(job_id)))


@job.command("cancel")
@click.argument("job_id")
@client_options
def job_cancel(job_id: str, url: str, ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """Cancel a running job."""
    click.echo(json.dumps(make_client(url, ca, cert, key).cancel(job_id)))


@job.command("init")
@click.option("--csv", "csv_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="One site's data file: its header and first rows shape the job.")
@click.option("--target", required=True, help="The column to predict.")
@click.option("--positive", multiple=True, help="A target value that counts as positive (repeatable).")
@click.option("--positive-above", type=float, default=None, help="A numeric target above this is positive.")
@click.option("--sites", required=True, help="The federation's sites, comma-separated.")
@click.option("--name", default=None, help="Job name (default: <dataset>-logreg).")
@click.option("--dataset", default=None, help="The name every site offers its file under (default: from the target).")
@click.option("--purpose", default="research", show_default=True, help="What the job is for; sites allow purposes.")
@click.option("--rounds", type=click.IntRange(1, 10_000), default=10, show_default=True)
@click.option("--rows", "max_rows", type=click.IntRange(1, 10_000_000), default=10_000, show_default=True,
              help="Read at most this many rows (after the header) to tell types and categories.")
@click.option("--max-levels", type=click.IntRange(2, 1000), default=30, show_default=True,
              help="A text column with more categories than this is left out (free text, identifiers).")
@click.option("--min-count", type=click.IntRange(1, 1_000_000), default=5, show_default=True,
              help="A category seen fewer times is left out of its vocabulary.")
@click.option("--exclude", multiple=True, help="A column never to use (repeatable).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the job here (default: standard output; the notes then go to standard error).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def job_init(csv_path: Path, target: str, positive: tuple[str, ...], positive_above: float | None, sites: str,
             name: str | None, dataset: str | None, purpose: str, rounds: int, max_rows: int, max_levels: int,
             min_count: int, exclude: tuple[str, ...], out: Path | None, force: bool) -> None:
    """Propose a commented job from a CSV's header and column types, for the sites to review."""
    from fedsilo.jobinit import propose_job

    if out is not None and out.exists() and not force:
        raise click.ClickException(f"{out} exists; pass --force to overwrite it")
    text, notes = propose_job(
        csv_path, target, [s.strip() for s in sites.split(",") if s.strip()], positive=positive,
        positive_above=positive_above, name=name, dataset=dataset, purpose=purpose, rounds=rounds,
        max_rows=max_rows, max_levels=max_levels, min_count=min_count, exclude=exclude)
    for note in notes:
        click.echo(note, err=out is None)
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text)
        click.echo(f"wrote {out}: review it, then `fedsilo local init --job {out} ...` or `fedsilo job submit {out}`")


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


@main.command("sites")
@client_options
def sites(url: str, ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """List the sites the aggregator knows: online or not, last seen, jobs, ε spent over all jobs."""
    from fedsilo.progress import ENDED
    from fedsilo.summary import ago

    client = make_client(url, ca, cert, key)
    rows = client.sites()
    decisions = client.decisions()
    click.echo(f"{'site':<20} {'state':<8} {'last seen':<10} {'jobs':<34} {'ε spent':>8}")
    for s in rows:
        mine = [d for d in decisions if d["site"] == s["site"]]
        accepted = sum(d["decision"] == "accepted" for d in mine)
        refused = sum(d["decision"] == "refused" for d in mine)
        active = sum(d["decision"] == "accepted" and d.get("job_state") not in ENDED for d in mine)
        spent = [d["epsilon_spent"] for d in mine if d.get("epsilon_spent") is not None]
        jobs = f"{accepted} accepted, {refused} refused, {active} active"
        eps = f"{sum(spent):.2f}" if spent else "—"
        click.echo(f"{s['site']:<20} {s['state']:<8} {ago(s.get('at')):<10} {jobs:<34} {eps:>8}")
    if not rows:
        click.echo("(no site has connected yet)")


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
