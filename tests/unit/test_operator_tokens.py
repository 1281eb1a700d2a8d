"""Operator tokens: an expiry and revocation in the operators file, honoured on the next request without a restart
(the file is re-read only when it changes), and the CLI that issues and revokes them."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from aggregator.auth import (
    Identity,
    OperatorsFileError,
    OperatorToken,
    OperatorTokens,
    TokenRefusal,
    load_operators_file,
    write_operators_file,
)
from fedsilo.cli import main

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def entry(token: str, name: str = "alice", **extra: object) -> OperatorToken:
    return OperatorToken.model_validate({"name": name, "role": "viewer",
                                         "token_sha256": hashlib.sha256(token.encode()).hexdigest(), **extra})


def test_tokens_from_the_file_expire_are_revoked_and_vanish_without_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "operators.yaml"
    write_operators_file(path, (entry("t-alice"), entry("t-bob", "bob", expires_at=NOW + dt.timedelta(hours=1))))
    tokens = OperatorTokens((entry("t-static", "carol"),), path)
    tokens.check()
    assert tokens.identify("t-alice", NOW) == Identity("alice", "viewer")
    assert tokens.identify("t-bob", NOW) == Identity("bob", "viewer")
    assert tokens.identify("t-static", NOW) == Identity("carol", "viewer")
    assert tokens.identify("t-bob", NOW + dt.timedelta(hours=2)) == TokenRefusal(
        "token_expired", f"token expired at {(NOW + dt.timedelta(hours=1)).isoformat()} (operator 'bob')")
    assert tokens.identify("nope", NOW) == TokenRefusal("unknown_token", "unknown token")

    write_operators_file(path, (entry("t-alice", revoked=True),))  # revoke alice, remove bob
    assert tokens.identify("t-alice", NOW) == TokenRefusal("token_revoked", "token revoked (operator 'alice')")
    assert tokens.identify("t-bob", NOW) == TokenRefusal("unknown_token", "unknown token")
    assert tokens.identify("t-static", NOW) == Identity("carol", "viewer")


def test_a_broken_operators_file_refuses_its_tokens_until_fixed(tmp_path: Path) -> None:
    path = tmp_path / "operators.yaml"
    write_operators_file(path, (entry("t-alice"),))
    failures: list[int] = []
    tokens = OperatorTokens((), path, on_reload_failure=lambda: failures.append(1))
    tokens.check()
    path.write_text("operators: [{name: alice, role: root}]\n")  # an edit gone wrong fails closed
    assert tokens.identify("t-alice", NOW).__class__ is TokenRefusal
    assert tokens.identify("t-alice", NOW).__class__ is TokenRefusal
    assert failures == [1]  # once per change of the file, not per request
    path.unlink()
    assert isinstance(tokens.identify("t-alice", NOW), TokenRefusal)
    write_operators_file(path, (entry("t-alice"),))
    assert tokens.identify("t-alice", NOW) == Identity("alice", "viewer")
    assert failures == [1, 1]


@pytest.mark.parametrize("text, message", [
    ("operators: [{name: 'a b', role: viewer, token_sha256: " + "0" * 64 + "}]", "operators.0.name"),
    ("operators: [{name: a, role: viewer, token_sha256: " + "0" * 64 + ", expires_at: 2030-01-01T00:00:00}]",
     "operators.0.expires_at"),  # an expiry without a time zone is ambiguous
    ("operators: [", r"operators.yaml, line 1, column \d+: "),  # YAML's own problem, where it is
    ("operators: []\noperators: []", "duplicate key 'operators'"),
])
def test_an_invalid_operators_file_stops_the_start_with_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "operators.yaml"
    path.write_text(text)
    with pytest.raises(OperatorsFileError, match=message) as caught:
        OperatorTokens((), path).check()
    assert "\n" not in str(caught.value)
    with pytest.raises(OperatorsFileError, match="cannot read the operators file"):
        OperatorTokens((), tmp_path / "missing.yaml").check()


def test_the_file_is_read_only_when_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "operators.yaml"
    write_operators_file(path, (entry("t-alice"),))
    tokens = OperatorTokens((), path)
    tokens.check()
    reads: list[Path] = []
    real = Path.read_text

    def counted(self: Path, *args: object, **kwargs: object) -> str:
        reads.append(self)
        return real(self)

    monkeypatch.setattr(Path, "read_text", counted)
    for _ in range(1000):
        assert tokens.identify("t-alice", NOW) == Identity("alice", "viewer")
    assert reads == []
    os.utime(path)
    tokens.identify("t-alice", NOW)
    assert reads == [path]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def token_of(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("token ")).rsplit(" ", 1)[1]


def test_cli_issues_tokens_with_a_ttl_into_the_file_and_revokes_them(tmp_path: Path) -> None:
    path = tmp_path / "operators.yaml"
    code, out = run("operator", "token", "alice", "--role", "admin", "--ttl", "12h", "--file", str(path))
    assert code == 0, out
    first = token_of(out)
    code, out = run("operator", "token", "alice", "--file", str(path))
    assert code == 0, out
    second = token_of(out)
    assert path.stat().st_mode & 0o777 == 0o600
    saved = load_operators_file(path)
    assert [(t.name, t.role) for t in saved] == [("alice", "admin"), ("alice", "viewer")]
    expires = saved[0].expires_at
    assert expires is not None
    assert dt.timedelta(hours=11.9) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=12)
    assert saved[1].expires_at is None
    tokens = OperatorTokens((), path)
    tokens.check()
    assert tokens.identify(first) == Identity("alice", "admin")

    code, out = run("operator", "revoke", "alice", "--sha256", saved[0].token_sha256[:10], "--file", str(path))
    assert code == 0 and "revoked 1 token(s) of alice" in out
    assert tokens.identify(first) == TokenRefusal("token_revoked", "token revoked (operator 'alice')")
    assert tokens.identify(second) == Identity("alice", "viewer")
    code, out = run("operator", "revoke", "alice", "--file", str(path))
    assert code == 0 and "revoked 1 token(s)" in out
    code, out = run("operator", "revoke", "alice", "--file", str(path))
    assert code != 0 and "already revoked" in out
    code, out = run("operator", "revoke", "bob", "--file", str(path))
    assert code != 0 and "no token of 'bob'" in out


def test_cli_prints_a_config_entry_without_a_file() -> None:
    code, out = run("operator", "token", "alice", "--ttl", "30d")
    assert code == 0, out
    line = out.splitlines()[-1].strip()
    parsed = yaml.safe_load(line)
    got = OperatorToken.model_validate(parsed[0])
    assert got.name == "alice" and got.expires_at is not None
    assert hashlib.sha256(token_of(out).encode()).hexdigest() == got.token_sha256


@pytest.mark.parametrize("ttl", ["0", "-1h", "12x", "h", "11y", "99999d"])
def test_cli_refuses_a_bad_ttl(ttl: str) -> None:
    code, out = run("operator", "token", "alice", "--ttl", ttl)
    assert code != 0 and "--ttl" in out
