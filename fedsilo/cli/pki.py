"""`fedsilo certs ...` (certificates, revocation) and `fedsilo operator token|revoke`: the federation's identities."""

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
    click.echo(f"CA: {pki.ca_cert}\njob-signing key: {pki.signing_key} (public: {pki.signing_pub})\n"
               f"revocation list (empty): {pki.crl}")


def _issue(root: Path, role: str, name: str, hosts: list[str], force: bool) -> None:
    from fedsilo.certs import CertError, Pki

    try:
        issued = Pki(root).issue(role, name, hosts or None, force=force)
    except CertError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{role} {name}: {issued.cert} {issued.key}")


_reissue = click.option("--force", is_flag=True,
                        help="Overwrite existing files; issue a new certificate to a revoked name.")


@certs.command("issue-site")
@click.argument("name")
@_pki_dir
@_reissue
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
@_reissue
def certs_issue_operator(name: str, root: Path, force: bool) -> None:
    """Issue an operator's client certificate (submits and manages jobs)."""
    _issue(root, "operator", name, [], force)


_crl_days = click.option("--days", type=click.IntRange(1, 3650), default=None,
                         help="How long the CRL is valid (default 180 days). Past it Mosquitto refuses every client: "
                              "re-sign it with `fedsilo certs crl` before then.")


@certs.command("revoke")
@click.argument("name")
@click.option("--role", type=click.Choice(["site", "operator", "aggregator", "broker"]), default=None,
              help="The certificate's role, when NAME has certificates in several.")
@_pki_dir
@_crl_days
def certs_revoke(name: str, role: str | None, root: Path, days: int | None) -> None:
    """Revoke NAME's certificate: record it and re-sign the CRL (crl.pem) that the broker and aggregator read.

    The aggregator refuses the certificate as soon as its copy of crl.pem changes; Mosquitto reads its crlfile when
    it starts, so restart the broker (docs/identities.md)."""
    from fedsilo.certs import CRL_DAYS, CertError, Pki

    pki = Pki(root)
    try:
        entry = pki.revoke(name, role, days or CRL_DAYS)
    except CertError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"revoked {entry.role} {entry.name} (serial {entry.serial:x}); CRL: {pki.crl}")
    click.echo("next: copy the CRL to where the aggregator's `crl_file` and the broker's `crlfile` point (the "
               "aggregator picks it up at once), then restart the broker")


@certs.command("crl")
@_pki_dir
@_crl_days
def certs_crl(root: Path, days: int | None) -> None:
    """Re-sign the CRL (crl.pem) with every revocation so far and a new next-update time."""
    from cryptography import x509

    from fedsilo.certs import CRL_DAYS, CertError, Pki

    pki = Pki(root)
    try:
        path = pki.write_crl(days or CRL_DAYS)
    except CertError as exc:
        raise click.ClickException(str(exc)) from None
    crl = x509.load_pem_x509_crl(path.read_bytes())
    click.echo(f"{path}: {len(crl)} revoked certificate(s), valid until {crl.next_update_utc:%Y-%m-%d %H:%M} UTC")


@main.group("operator")
def operator_group() -> None:
    """Operator access to the aggregator's API and console."""


_TTL = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _ttl(value: str | None) -> int | None:
    """'90m', '12h', '30d' (or a number of seconds) as seconds; None for no expiry."""
    if value is None:
        return None
    text = value.strip().lower()
    unit = _TTL.get(text[-1:])
    number = text[:-1] if unit is not None else text
    if not number.isdigit() or int(number) == 0:
        raise click.BadParameter(f"{value!r}: give a positive whole number with s, m, h or d (e.g. 12h, 30d)",
                                 param_hint="--ttl")
    seconds = int(number) * (unit or 1)
    if seconds > 10 * 365 * 86400:
        raise click.BadParameter(f"{value!r} is more than ten years", param_hint="--ttl")
    return seconds


_operators_file = click.option(
    "--file", "path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="The aggregator's operators file (its `operators_file`): the entry is written there, and the aggregator "
         "honours the change on the next request.")


@operator_group.command("token")
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "admin"]), default="viewer", show_default=True)
@click.option("--ttl", default=None, metavar="DURATION",
              help="The token expires this long from now: 90m, 12h, 30d... (default: never).")
@_operators_file
def operator_token(name: str, role: str, ttl: str | None, path: Path | None) -> None:
    """Create a bearer token for operator NAME; add it to the operators file (--file), or print the entry to put
    under `operators:` in the aggregator's config."""
    import datetime as dt

    import yaml

    from aggregator.auth import OperatorsFileError, OperatorToken, load_operators_file, new_token, write_operators_file
    from fedsilo.certs import CertError, check_name

    try:
        check_name(name, "operator")
    except CertError as exc:
        raise click.ClickException(str(exc)) from None
    seconds = _ttl(ttl)
    token, digest = new_token()
    expires = None if seconds is None else (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).replace(
        microsecond=0)
    entry = OperatorToken(name=name, role=role, token_sha256=digest, expires_at=expires)  # type: ignore[arg-type]
    if path is not None:
        try:
            existing = load_operators_file(path) if path.exists() else ()
            write_operators_file(path, (*existing, entry))
        except OperatorsFileError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"token (give it to {name}; it is shown once): {token}")
    if expires is not None:
        click.echo(f"expires at {expires.isoformat()}")
    if path is not None:
        click.echo(f"added to {path} (sha256 {digest[:12]}...)")
    else:
        click.echo("aggregator config entry (under `operators:`):")
        line = yaml.safe_dump([entry.model_dump(mode="json", exclude_defaults=True)], default_flow_style=True)
        click.echo(f"  - {line.strip()[1:-1]}")


@operator_group.command("revoke")
@click.argument("name")
@click.option("--sha256", "prefix", default=None, metavar="PREFIX",
              help="Only the token whose sha256 starts with PREFIX (default: every token of NAME).")
@click.option("--file", "path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The aggregator's operators file (its `operators_file`).")
def operator_revoke(name: str, prefix: str | None, path: Path) -> None:
    """Revoke operator NAME's tokens in the operators file; the aggregator refuses them from the next request on
    (401 token_revoked). Tokens in the aggregator's config file itself need an edit and a restart."""
    from aggregator.auth import OperatorsFileError, load_operators_file, write_operators_file

    try:
        tokens = load_operators_file(path)
    except OperatorsFileError as exc:
        raise click.ClickException(str(exc)) from None
    hits = [t for t in tokens if t.name == name and (prefix is None or t.token_sha256.startswith(prefix.lower()))]
    if not hits:
        raise click.ClickException(f"no token of {name!r}{f' with sha256 {prefix}...' if prefix else ''} in {path}")
    fresh = [t for t in hits if not t.revoked]
    if not fresh:
        raise click.ClickException(f"every matching token of {name!r} in {path} is already revoked")
    write_operators_file(path, tuple(t.model_copy(update={"revoked": True}) if t in fresh else t for t in tokens))
    click.echo(f"revoked {len(fresh)} token(s) of {name} in {path}: "
               + ", ".join(f"{t.token_sha256[:12]}..." for t in fresh))
