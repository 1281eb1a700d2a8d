"""Shared fixtures: a private Mosquitto (per test or per session), free loopback ports, and a private
PostgreSQL server for the session.

The servers run on free ports in temporary directories, never on the machine's own 1883 or 5432. If
`mosquitto` is missing, the broker fixtures fail with the message from `find_mosquitto()` (run `make install`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedsilo import netutil
from fedsilo.broker import MosquittoBroker
from tests.pgserver import PostgresServer

_db_names = itertools.count()


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return netutil.free_port()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A started broker of this test's own (plain MQTT, anonymous, persistent); stopped after the test.

    Tests may `restart()`, `stop()` or `kill()` it; teardown copes with any of those."""
    b = MosquittoBroker(tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="session")
def session_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One broker shared by the whole session: use unique client ids and topics, and don't restart it."""
    b = MosquittoBroker(tmp_path_factory.mktemp("session-broker"))
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> str:
    """A fresh, empty database for one test."""
    return postgres.create_database(f"fedsilo_test_{next(_db_names)}")


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's headless Chromium driven by Playwright (never `playwright install`: nothing is downloaded).

    Yields a Playwright `Browser`; tests open their own contexts and close them. Module-scoped because
    Playwright's sync API keeps an event loop running in the main thread while it is open, and every later
    test calling `asyncio.run()` would then fail."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make install-test` (Debian package chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def artifacts_dir() -> Path:
    """Where tests keep what a person may want to look at afterwards (screenshots, reports): ./artifacts."""
    path = Path(__file__).resolve().parent.parent / "artifacts"
    path.mkdir(exist_ok=True)
    return path
