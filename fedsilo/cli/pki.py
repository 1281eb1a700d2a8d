"""`fedsilo certs ...` and `fedsilo operator token`: the federation's identities."""

from __future__ import annotations

from pathlib import Path

import click

from fedsilo.cli._root import main


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


