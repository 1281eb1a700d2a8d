"""The `fedsilo` group, the options operator commands share, and the one-line handling of expected failures."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from federation.yamlfile import ConfigFileError
from fedsilo.errors import FedsiloError

if TYPE_CHECKING:
    from fedsilo.client import AggregatorClient


class _Main(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        """A failure the message fully explains (unreachable aggregator, bad input, port in use...) is one line."""
        try:
            return super().invoke(ctx)
        except (FedsiloError, ConfigFileError) as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """Cross-silo federated learning for hospitals: raw data never leaves a site."""
    # Everything fedsilo writes (data splits, keys, state, logs, reports) is its user's alone.
    os.umask(0o077)


def exit_now(code: int = 0) -> NoReturn:
    """Leave at once, skipping the interpreter's teardown of torch, pandas and friends (1–2 s of CPU that holds
    nothing): for the services, once they have closed their state, logs and connections themselves."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


DEFAULT_AGGREGATOR = "https://127.0.0.1:8443"


def client_options(f: Callable[..., None]) -> Callable[..., None]:
    """The aggregator URL and the operator's TLS identity (env: FEDSILO_AGGREGATOR, FEDSILO_CA, ...)."""
    for opt in reversed([
        click.option("--aggregator", "url", envvar="FEDSILO_AGGREGATOR", default=DEFAULT_AGGREGATOR,
                     show_default=True, help="Aggregator base URL (env: FEDSILO_AGGREGATOR)."),
        click.option("--ca", envvar="FEDSILO_CA", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="CA certificate of the federation (env: FEDSILO_CA)."),
        click.option("--cert", envvar="FEDSILO_CERT", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Operator client certificate (env: FEDSILO_CERT)."),
        click.option("--key", envvar="FEDSILO_KEY", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Operator client key (env: FEDSILO_KEY)."),
    ]):
        f = opt(f)
    return f


def make_client(url: str, ca: Path | None, cert: Path | None, key: Path | None) -> AggregatorClient:
    import ssl

    from federation.transport import TLSConfig
    from fedsilo.client import AggregatorClient

    if ca is None and cert is None:
        return AggregatorClient(url)
    if ca is None:
        raise click.ClickException("an operator certificate needs the federation's CA too: --ca or FEDSILO_CA")
    try:
        context = TLSConfig(ca_file=ca, cert_file=cert, key_file=key).client_context()
    except (ssl.SSLError, OSError) as exc:
        raise click.ClickException(f"cannot load the CA {ca} or the operator certificate {cert} and key {key}: "
                                   f"{getattr(exc, 'reason', None) or exc}") from None
    return AggregatorClient(url, context)


def workspace_option(f: Callable[..., None]) -> Callable[..., None]:
    return click.option(
        "--workspace", "-w", type=click.Path(file_okay=False, path_type=Path), envvar="FEDSILO_WORKSPACE",
        default=Path("fedsilo-local"), show_default=True,
        help="The local federation's directory (env: FEDSILO_WORKSPACE).")(f)
