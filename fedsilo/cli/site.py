"""A site's own tools: data files, scoring a model on data it holds, its policy, its audit log."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fedsilo.cli._root import main


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


@data.command("synthetic")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--rows", type=click.IntRange(10, 1_000_000), default=300, show_default=True, help="Rows per site.")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def data_synthetic(out: Path, rows: int, force: bool) -> None:
    """Write three clinics' CSVs of a made-up outcome study (another schema than heart disease), to try
    `fedsilo job init` and `fedsilo local` on before your own data."""
    from fedsilo.datasets import CLINICS, write_clinics

    existing = [str(out / f"{c}.csv") for c in CLINICS if (out / f"{c}.csv").exists()]
    if existing and not force:
        raise click.ClickException(f"{', '.join(existing)} exist(s); pass --force to overwrite")
    for site, path in write_clinics(out, rows).items():
        click.echo(f"{site}: {path}")


@main.group()
def model() -> None:
    """Models a federation produced."""


@model.command("evaluate")
@click.argument("model_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--job", "job_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The job that trained it: its model, features, target rule and split.")
@click.option("--data", "data_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="A CSV this site holds.")
@click.option("--rows", type=click.Choice(["validation", "all"]), default="validation", show_default=True,
              help="validation: the job's split of this file, scored as the site's agent scores it; all: a file "
                   "held out of the federation, every row (encoder fitted on the file itself).")
def model_evaluate(model_file: Path, job_file: Path, data_file: Path, rows: str) -> None:
    """Score a model (safetensors, e.g. a report's model.safetensors) on data you hold: AUC, loss, calibration."""
    from fedsilo.localinit import load_job
    from fedsilo.scoring import Rows, score_file, score_lines

    spec = load_job(job_file)
    which: Rows = "all" if rows == "all" else "validation"
    score = score_file(model_file, spec, data_file, which)
    for line in score_lines(score, which, spec):
        click.echo(line)


@main.group()
def policy() -> None:
    """Site policies: validate, explain, export the schema."""


@policy.command("check")
@click.argument("policy_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def policy_check(policy_file: Path) -> None:
    """Validate a site policy and print what it allows in plain words."""
    from agent.policy import SitePolicy, describe
    from federation.yamlfile import ConfigFileError

    try:
        p = SitePolicy.load(policy_file)
    except ConfigFileError as exc:
        raise click.ClickException(f"not a valid policy: {exc}") from None
    for line in describe(p):
        click.echo(line)


@policy.command("explain")
@click.argument("policy_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--spent", type=float, default=0.0, show_default=True, help="ε already spent on the dataset.")
def policy_explain(policy_file: Path, job_file: Path, spent: float) -> None:
    """Say whether a job would be accepted under a policy and, if not, every reason."""
    from agent.daemon import load_data
    from agent.policy import SitePolicy, evaluate
    from federation.jobs import JobSpec
    from federation.yamlfile import ConfigFileError, read_text

    p = SitePolicy.load(policy_file)  # a policy that does not load: one line (`_Main`), exit 1
    try:
        spec = JobSpec.from_yaml(read_text(job_file), str(job_file))
    except ConfigFileError as exc:  # no agent would run it: its offer would not even parse
        click.echo(f"REFUSE: {p.site} would refuse this job: {exc}")
        sys.exit(1)
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
@click.option("--aggregator-head", "recorded",
              help="The head the aggregator recorded for this site (GET /api/v1/sites/SITE/audit-head): its sha256, "
                   "SEQ:SHA256, or a file holding that JSON answer. Detects a chain rewritten and re-chained here.")
def audit_verify(log_file: Path, state_db: Path | None, recorded: str | None) -> None:
    """Verify the chain: any edited, reordered or deleted entry is reported."""
    from agent.audit import verify
    from agent.state import AgentState

    head = AgentState(state_db).audit_head() if state_db else None
    result = verify(log_file, head, _recorded_head(recorded) if recorded else None)
    if result.ok:
        click.echo(f"OK: {result.entries} entries, chain intact")
        return
    click.echo(f"TAMPERED: {len(result.problems)} problem(s) in {result.entries} entries", err=True)
    for p in result.problems:
        click.echo(f"  - {p}", err=True)
    sys.exit(1)


def _recorded_head(value: str) -> tuple[int | None, str]:
    """`--aggregator-head`: a sha256, SEQ:SHA256, or a file with the API's JSON answer."""
    import json
    import re

    text = value.strip()
    if not re.fullmatch(r"(\d+:)?[0-9a-f]{64}", text):
        try:
            answer = json.loads(Path(text).read_text())
            text = f"{int(answer['seq'])}:{answer['sha256']}"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise click.BadParameter(f"expected a sha256, SEQ:SHA256 or a file with the aggregator's JSON answer "
                                     f"({exc.__class__.__name__}: {exc})", param_hint="--aggregator-head") from None
    seq, _, digest = text.rpartition(":")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise click.BadParameter("the sha256 must be 64 lowercase hex digits", param_hint="--aggregator-head")
    return (int(seq) if seq else None), digest
