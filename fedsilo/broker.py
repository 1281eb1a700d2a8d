"""A private Mosquitto for the demo and the tests, on its own port, never the machine's standard one.

Persistence is on, so a restart keeps retained messages and persistent sessions just as a production
broker would; TLS (with client certificates as identities) and an ACL file are supported.

Mosquitto facts this relies on (2.0.x):
- it saves its in-memory state to `persistence_location` on a clean stop (SIGTERM) and, with
  `autosave_interval 1`, about once a second; a SIGKILL (`kill()`) can therefore lose the last second;
- started as root it switches to the user named by `user` (default `mosquitto`, who cannot read our 0600 keys or
  a root-owned working directory); started as anyone else it ignores `user`. The config therefore names the
  owner of the broker's key file (`run_as`): run by that owner, or by root, Mosquitto reads its keys as their
  owner, and nothing needs to be made readable by another account;
- with `per_listener_settings true`, `allow_anonymous`, the TLS files and `acl_file` apply to the listener
  they follow, so they are written after the `listener` line;
- it opens a listener's socket before loading its TLS files, so a port that accepts connections is not yet a
  broker that will stay up; the "mosquitto version ... running" log line (type `information`) comes after
  every listener is ready.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from federation import topics
from federation.jobs import SITE_NAME
from fedsilo.certs import NAME_RULE
from fedsilo.errors import FedsiloError
from fedsilo.netutil import free_port
from fedsilo.processes import ProcessTable

__all__ = ["MESSAGE_SIZE_LIMIT", "BrokerError", "BrokerTLS", "MosquittoBroker", "acl_for", "find_mosquitto",
           "mosquitto_config", "run_as"]

_SEARCH_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/bin/mosquitto")
# Mosquitto's `message_size_limit`: it drops (and does not deliver) any PUBLISH whose payload is larger, from anyone.
# The largest legitimate message is a signed job offer, which carries the job's spec: 1.9 KB for the examples, 144 KB
# for a job with 1,000 sites named with 63 characters, 1,000 numeric inputs and a prior on each (measured). 256 KiB
# leaves a wide margin over the first and room for the second. It is the aggregator's default
# `mqtt_max_publish_bytes` (a job whose signed offer would be larger is refused at submit, since an offer over the
# limit would be dropped without a word, and with it the job) and the ceiling of its `mqtt_max_message_bytes`
# (16 KiB by default, applied again by the aggregator, with a rate limit, to what each site sends). The aggregator
# chart renders the same value from one setting.
MESSAGE_SIZE_LIMIT = 256 * 1024


class BrokerError(FedsiloError, RuntimeError):
    pass


@dataclass(frozen=True)
class BrokerTLS:
    """The broker's TLS material. With `require_certificate` a client must present a certificate signed by
    `cafile`; with `use_identity_as_username` its certificate's CN becomes its username (for the ACL)."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = True
    use_identity_as_username: bool = True
    # The federation CA's revocation list (`fedsilo certs revoke`). Mosquitto refuses to start if it is named and
    # missing; it reads it when the listener starts and again on SIGHUP, but only for new connections (a revoked
    # client already connected stays connected until a restart); past the CRL's next-update time it refuses every
    # client. docs/identities.md has what was measured with Mosquitto 2.0.11.
    crlfile: Path | None = None

    def __post_init__(self) -> None:
        # Without require_certificate mosquitto never asks for a client certificate, so there is no identity
        # to use as a username and it refuses every client ("not authorised"): reject the combination here.
        if self.use_identity_as_username and not self.require_certificate:
            raise ValueError("use_identity_as_username needs require_certificate")


def acl_for(sites: Iterable[str], aggregator: str = "aggregator") -> str:
    """Mosquitto ACL (usernames are certificate common names): the aggregator reads and writes every site's
    subtree; a site reads only its own offers and tasks and writes only its own status and events.
    Anyone else, including a certificate for a site not listed, may do nothing.

    Every name must follow the certificates' name rule (`fedsilo.certs.check_name`), and a name that does not is
    refused, never escaped: a site named `+` or `#` would be a wildcard in its own topic patterns (reading every
    site's offers), one with a newline would add ACL lines, one with `/` would reach into another subtree."""
    names = sorted(set(sites))
    for name in [aggregator, *names]:
        if not SITE_NAME.fullmatch(name):
            raise BrokerError(f"{name!r} cannot be named in the broker's ACL: a name is {NAME_RULE}")
    if aggregator in names:
        raise BrokerError(f"{aggregator!r} is the aggregator's name; a site cannot have it")
    lines = [f"user {aggregator}", f"topic readwrite {topics.ROOT}/#", ""]
    for site in names:
        lines += [
            f"user {site}",
            f"topic read {topics.offers(site, '#')}",
            f"topic read {topics.tasks(site, '#')}",
            f"topic write {topics.status(site)}",
            f"topic write {topics.events(site)}",
            "",
        ]
    return "\n".join(lines)


def run_as(path: Path) -> str:
    """The user Mosquitto should run as to read `path` (its key file): the file's owner."""
    uid = path.stat().st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # an owner without a passwd entry (e.g. a container's arbitrary UID): the number is refused
        raise BrokerError(f"{path} is owned by uid {uid}, which has no user name for Mosquitto's `user` option; "
                          "run as that user, or give the file to a named user") from None


def mosquitto_config(
    *, host: str, port: int, persistence_dir: Path, log_dest: str, tls: BrokerTLS | None, acl_file: Path | None,
    run_as: str | None, autosave_interval: int = 10, message_size_limit: int = MESSAGE_SIZE_LIMIT,
) -> str:
    """mosquitto.conf for one listener: mutual TLS with the certificate CN as username and the ACL file, or plain
    anonymous MQTT for tests without TLS. `fedsilo broker config` and the local launcher both write this text;
    the aggregator chart's ConfigMap has the same listener, TLS and ACL settings
    (`deploy/helm/aggregator/templates/mosquitto.yaml`).
    """
    lines = [f"user {run_as}"] if run_as is not None else []
    lines += [
        "per_listener_settings true",
        "persistence true",
        f"persistence_location {persistence_dir}/",  # mosquitto appends the file name: the slash matters
        "persistence_file mosquitto.db",
        f"autosave_interval {autosave_interval}",
        f"log_dest {log_dest}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",  # for the "running" line `start` waits for (and a save line when state changed)
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "max_queued_messages 10000",
        f"message_size_limit {message_size_limit}",  # a global option: before the listener
        f"listener {port} {host}",
    ]
    if tls is None:
        lines.append("allow_anonymous true")
    else:
        lines += [
            f"cafile {tls.cafile}",
            f"certfile {tls.certfile}",
            f"keyfile {tls.keyfile}",
            *([f"crlfile {tls.crlfile}"] if tls.crlfile is not None else []),
            f"require_certificate {'true' if tls.require_certificate else 'false'}",
            f"use_identity_as_username {'true' if tls.use_identity_as_username else 'false'}",
            "allow_anonymous false" if tls.require_certificate else "allow_anonymous true",
        ]
    if acl_file is not None:
        lines.append(f"acl_file {acl_file}")
    return "\n".join(lines) + "\n"


def find_mosquitto() -> Path:
    """The `mosquitto` binary: on PATH, else where Debian puts it (/usr/sbin is not on a normal user's PATH)."""
    found = shutil.which("mosquitto") or next((p for p in _SEARCH_PATHS if os.access(p, os.X_OK)), None)
    if found is None:
        raise BrokerError(
            "mosquitto is not installed: run `make install` (as root), or `sudo apt-get install -y mosquitto`"
        )
    return Path(found)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class MosquittoBroker:
    """A `mosquitto` child process with its config, persistence and log in `workdir`.

    The port is chosen once (a free loopback port unless given) and kept across `restart()`, so clients
    configured with it reconnect to the same broker, which comes back with its retained messages and
    persistent sessions.
    """

    def __init__(
        self, workdir: Path, port: int | None = None, tls: BrokerTLS | None = None, acl_file: Path | None = None,
        *, processes: ProcessTable | None = None, detach: bool = False, write_config: bool = True,
    ) -> None:
        """`processes`: record the broker's pid there (for `fedsilo local status|down`); `detach`: in a session of
        its own, so that it outlives the command that started it; `write_config=False`: start from the
        mosquitto.conf already in `workdir` (written by `fedsilo local init`, perhaps reviewed since)."""
        self.workdir = workdir.resolve()
        self._host = "127.0.0.1"
        self._port = port if port is not None else free_port(self._host)
        self.tls = tls
        self.acl_file = acl_file.resolve() if acl_file is not None else None
        self._processes = processes
        self._detach = detach
        self._write_config = write_config
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    # -- addresses -------------------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self._host}:{self._port}"

    # -- files -----------------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_file(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def stderr_file(self) -> Path:
        return self.workdir / "mosquitto.stderr"

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the broker's log and of its stderr (where it reports config errors before logging)."""
        parts = []
        for f in (self.stderr_file, self.log_file):
            if f.exists():
                text = f.read_text(errors="replace").strip()
                if text:
                    parts.append(f"--- {f.name}\n{text[-chars:]}")
        return "\n".join(parts) or "(no broker output)"

    def config_text(self) -> str:
        return mosquitto_config(
            host=self._host, port=self._port, persistence_dir=self.workdir, log_dest=f"file {self.log_file}",
            tls=self.tls, acl_file=self.acl_file, autosave_interval=1, run_as=self._run_as(),
        )

    def _run_as(self) -> str | None:
        """The owner of the key (or of the working directory without TLS); before they exist, whoever runs this.
        None for an account without a name: `user` matters only when started as root, and root has one."""
        owned = self.tls.keyfile if self.tls is not None else self.workdir
        try:
            return run_as(owned) if owned.exists() else pwd.getpwuid(os.geteuid()).pw_name
        except (BrokerError, KeyError):
            return None

    # -- process ---------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self, timeout: float = 10.0) -> None:
        """Start mosquitto and return once it reports itself running and its port accepts connections; raise
        `BrokerError` with the log tail if it exits or is not ready within `timeout` seconds.

        An accepting port alone is not readiness: mosquitto listens before it loads the listener's TLS files,
        so a broker about to exit on a bad certificate briefly accepts connections."""
        if self.running:
            raise BrokerError(f"broker already running on port {self._port} (pid {self.pid})")
        binary = find_mosquitto()
        if _accepts(self._host, self._port):
            raise BrokerError(f"port {self._port} on {self._host} is already in use by another process")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._write_config or not self.config_file.exists():
            self.config_file.write_text(self.config_text())
        log_start = self.log_file.stat().st_size if self.log_file.exists() else 0  # the log spans restarts
        self._stderr = self.stderr_file.open("ab")
        self._proc = subprocess.Popen(
            [str(binary), "-c", str(self.config_file)],
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
            cwd=self.workdir,
            start_new_session=self._detach,
        )
        if self._processes is not None:
            self._processes.record("broker", self._proc.pid)
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self._reap()
                raise BrokerError(f"mosquitto exited with status {code} on port {self._port}:\n{self.log_tail()}")
            if self._reports_running(log_start) and _accepts(self._host, self._port):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(
                    f"mosquitto did not listen on {self._host}:{self._port} within {timeout:g}s:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def _reports_running(self, log_start: int) -> bool:
        """Whether mosquitto has logged, since `log_start`, that every listener is up ("... running")."""
        try:
            with self.log_file.open("rb") as f:
                f.seek(log_start)
                return re.search(rb"mosquitto version \S+ running", f.read()) is not None
        except FileNotFoundError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its state and exits), then SIGKILL after `timeout` seconds."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL, as a crash would: no clean shutdown, no final save (state is at most ~1 s old)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._reap()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop cleanly and start again on the same port with the same persistence."""
        self.stop()
        self.start(timeout)

    def _reap(self) -> None:
        if self._proc is not None and self._processes is not None:
            self._processes.forget("broker")
        self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MosquittoBroker({self.url}, workdir={self.workdir}, running={self.running})"
