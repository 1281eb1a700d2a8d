"""The ops console in Debian's headless Chromium against a real federation: a broker, the aggregator and three
hospital agents (two train for real, one refuses every job). Viewers see everything and can change nothing;
admins submit, pause, resume and cancel jobs; the charts fill in as rounds finish; the page logs no errors.

The browser trusts the aggregator exactly as a pinned key: it is launched with the SHA-256 of the
aggregator certificate's public key (`--ignore-certificate-errors-spki-list`), not with certificate errors
ignored in general. Operators authenticate with bearer tokens, as the console does.
"""

from __future__ import annotations

import base64
import hashlib
import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from playwright.sync_api import Browser, ConsoleMessage, Page, expect
from playwright.sync_api import Error as PlaywrightError

from federation.messages import UpdateEnvelope
from federation.tensors import sha256_hex
from fedsilo.client import AggregatorClient, ApiError
from fedsilo.datasets import split_by_center
from fedsilo.local import LocalFederation, example_policy
from tests.conftest import CHROMIUM
from tests.participants import post_update
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
SITES = ("cleveland", "hungary")  # train
REFUSER = "switzerland"  # its data file is missing: it refuses every job, with that reason
WAIT_MS = 60_000


def job_yaml(name: str, rounds: int) -> str:
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec.update(name=name, rounds=rounds, sites=[*SITES, REFUSER], min_sites=2, accept_deadline_s=20,
                hyperparameters={"epochs": 1, "learning_rate": 0.1, "batch_size": 32},
                privacy={"clip_norm": 1.0, "noise_multiplier": 0.2, "delta": 1e-5})
    return yaml.safe_dump(spec, sort_keys=False)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("console")
    files = split_by_center(root / "data")
    policies: dict[str, dict[str, Any]] = {}
    files[REFUSER] = root / "data" / "missing.csv"
    for site in (*SITES, REFUSER):
        policy = example_policy(site, {"heart-disease": files[site]})
        policy["privacy"].update(min_noise_multiplier=0.05, max_epsilon_per_job=1e9)
        policy["privacy"]["budgets"]["heart-disease"]["epsilon"] = 1e10
        policy["operations"]["max_concurrent_jobs"] = 4
        policies[site] = policy
    with LocalFederation(root, policies, heartbeat_s=1.0) as f:
        yield f


@pytest.fixture(scope="module")
def browser(chromium: Browser, fed: LocalFederation) -> Iterator[Browser]:
    """Chromium trusting the aggregator's key only (the session's browser trusts nothing of ours)."""
    cert = x509.load_pem_x509_certificate(fed.pki.issued("aggregator", "aggregator").cert.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    b = chromium.browser_type.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", f"--ignore-certificate-errors-spki-list={pin}"])
    expect.set_options(timeout=WAIT_MS)  # rounds take longer on a busy machine; waits end as soon as they can
    try:
        yield b
    finally:
        expect.set_options(timeout=5_000)  # Playwright's default
        b.close()


class Console:
    """One browser tab on the console, recording every console error and uncaught exception."""

    def __init__(self, browser: Browser, fed: LocalFederation) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page: Page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.errors: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        self.url = fed.url + "/console/"
        self.page.goto(self.url)

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.errors.append(msg.text)

    def sign_in(self, token: str) -> None:
        self.page.fill("#token", token)
        self.page.click("#signin")

    def open(self, fragment: str) -> None:
        self.page.goto(self.url + fragment)

    def close(self) -> None:
        self.context.close()


def reject_one(fed: LocalFederation, job_id: str) -> None:
    """Hospital cleveland uploads an update claiming to be hungary: refused, and recorded with its reason."""
    body = b"not an update"
    env = UpdateEnvelope(job_id=job_id, round=1, site="hungary", num_samples=50, sha256=sha256_hex(body),
                         evaluation=None, train_loss=0.5, epsilon=1.0)
    assert post_update(fed, "cleveland", env, body)[0] == 403


@pytest.fixture
def console(browser: Browser, fed: LocalFederation) -> Iterator[Console]:
    c = Console(browser, fed)
    yield c
    c.close()


def test_an_unpinned_browser_does_not_trust_the_aggregator(chromium: Browser, fed: LocalFederation) -> None:
    context = chromium.new_context()
    try:
        with pytest.raises(PlaywrightError, match="ERR_CERT_AUTHORITY_INVALID"):
            context.new_page().goto(fed.url + "/console/")
    finally:
        context.close()


def test_bad_token_is_refused_with_a_clear_message(console: Console) -> None:
    console.sign_in("not-a-token")
    expect(console.page.locator("#banner")).to_contain_text("Not signed in (401)")
    expect(console.page.locator("#token")).to_be_visible()
    expect(console.page.locator("#nav")).to_be_hidden()


def test_viewer_sees_sites_and_jobs_but_cannot_act(console: Console, fed: LocalFederation) -> None:
    job_id = fed.client.submit(job_yaml("console-viewer", rounds=2))
    assert fed.wait_job(job_id, timeout=120)["state"] == "finished"
    reject_one(fed, job_id)
    page = console.page
    console.sign_in(fed.tokens["ops-viewer"][1])
    expect(page.locator("#who")).to_have_text("ops-viewer (viewer)")
    for site in SITES:
        row = page.locator(f"#sites-table tr[data-site={site}]")
        expect(row.locator(".badge.online")).to_be_visible()
        expect(row.locator("td").nth(3).locator(f"a[href='#/jobs/{job_id}']")).to_be_visible()  # accepted
        # ε spent, with its unit: these jobs are per site (update-level noise)
        expect(row.locator("td").nth(5)).to_have_text(re.compile(r"^ε \d+\.\d\d per site$"))
    refuser = page.locator(f"#sites-table tr[data-site={REFUSER}]")
    expect(refuser.locator(".badge.online")).to_be_visible()
    expect(refuser.locator("td").nth(4).locator("li").first).to_contain_text("does not exist")
    expect(refuser.locator("td").nth(5)).to_have_text("—")
    console.open("#/jobs")
    expect(page.locator(f"#jobs-table tr[data-job='{job_id}']")).to_contain_text("finished")
    expect(page.locator("#submit-job")).to_be_disabled()
    page.click(f"#jobs-table a[href='#/jobs/{job_id}']")
    expect(page.locator("#job-facts")).to_contain_text("finished")
    for button in ("#pause", "#resume", "#cancel"):
        expect(page.locator(button)).to_be_disabled()
    expect(page.locator("#chart-global-auc circle.pt")).to_have_count(3)  # model versions 0, 1, 2
    expect(page.locator(f"#job-sites tr[data-site={REFUSER}]")).to_contain_text("does not exist")
    rejected = page.locator("#job-rejections tbody tr")
    expect(rejected).to_have_count(1)
    expect(rejected).to_contain_text("identity_mismatch")
    expect(rejected).to_contain_text("authenticated as 'cleveland'")
    # The buttons are only a courtesy: the API itself refuses a viewer.
    ca = ssl.create_default_context(cafile=str(fed.pki.ca_cert))
    viewer = AggregatorClient(fed.url, ca, token=fed.tokens["ops-viewer"][1])
    with pytest.raises(ApiError) as exc:
        viewer.cancel(job_id)
    assert exc.value.status == 403
    assert console.errors == []


def test_admin_submits_follows_pauses_resumes_and_cancels(
    console: Console, fed: LocalFederation, artifacts_dir: Path
) -> None:
    page = console.page
    console.sign_in(fed.tokens["ops-admin"][1])
    expect(page.locator("#who")).to_have_text("ops-admin (admin)")
    expect(page.locator("#sites-table .badge.online")).to_have_count(len(SITES) + 1)

    # Submit a long job from the jobs view and open its page.
    console.open("#/jobs")
    page.fill("#job-yaml", job_yaml("console-long", rounds=400))
    page.click("#submit-job")
    expect(page.locator("#submit-result")).to_contain_text("Submitted")
    job_id = page.locator("#submit-result a").inner_text()
    expect(page.locator(f"#jobs-table tr[data-job='{job_id}']")).to_be_visible()
    page.click("#submit-result a")
    facts = page.locator("#job-facts")
    expect(facts.locator(".badge.running")).to_be_visible()

    # The charts fill in as rounds finish: a point per model version, per site too.
    expect(page.locator("#chart-global-auc circle.pt").nth(2)).to_be_attached()
    expect(page.locator("#chart-global-loss circle.pt").nth(2)).to_be_attached()
    expect(page.locator("#chart-site-auc circle.pt").nth(2 * len(SITES))).to_be_attached()
    expect(page.locator("#chart-site-loss circle.pt").nth(2 * len(SITES))).to_be_attached()
    expect(page.locator("#job-sites tr[data-site] .badge.accepted")).to_have_count(len(SITES))
    expect(page.locator(f"#job-sites tr[data-site={REFUSER}] .badge.refused")).to_be_visible()
    expect(facts).not_to_contain_text("null")

    # Pause: the engine records it and the page shows it; resume: rounds advance again.
    page.click("#pause")
    expect(facts.locator(".badge.paused")).to_be_visible()
    expect(page.locator("#pause")).to_be_disabled()
    assert fed.client.job(job_id)["paused"] is True
    paused_round = int(page.locator("#job-round").inner_text())
    page.click("#resume")
    expect(facts.locator(".badge.paused")).to_have_count(0)
    assert fed.client.job(job_id)["paused"] is False
    page.wait_for_function(
        "r => Number(document.querySelector('#job-round').textContent) > r", arg=paused_round, timeout=WAIT_MS)

    # A site's update that fails a check shows up on the job page with its reason.
    reject_one(fed, job_id)
    expect(page.locator("#job-rejections tbody tr")).to_contain_text("identity_mismatch")

    # A picture for people: the job page with a dozen rounds drawn.
    expect(page.locator("#chart-global-auc circle.pt").nth(12)).to_be_attached()
    shot = artifacts_dir / "console.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:4] == b"\x89PNG"

    # Cancel another job, from its page (two clicks).
    console.open("#/jobs")
    page.fill("#job-yaml", job_yaml("console-cancel", rounds=400))
    page.click("#submit-job")
    expect(page.locator("#submit-result")).to_contain_text("Submitted")
    other = page.locator("#submit-result a").inner_text()
    # The sites view below lists the job as accepted: let both hospitals answer before it is cancelled (an agent
    # busy with the long job's rounds may take a few seconds on a loaded machine).
    wait_for(lambda: all(fed.client.job(other)["sites"].get(s, {}).get("decision") == "accepted" for s in SITES),
             what=f"both sites accepting {other}")
    page.click("#submit-result a")
    expect(page.locator("h1 code")).to_have_text(other)
    page.click("#cancel")
    expect(page.locator("#cancel")).to_have_text("Click again to cancel")
    page.click("#cancel")
    expect(facts.locator(".badge.cancelled")).to_be_visible()
    for button in ("#pause", "#resume", "#cancel"):
        expect(page.locator(button)).to_be_disabled()
    assert fed.client.job(other)["state"] == "cancelled"
    assert fed.client.job(job_id)["state"] == "running"
    fed.client.cancel(job_id)

    # The sites view: both hospitals online, with the jobs they accepted and the ε they spent.
    console.open("#/sites")
    for site in SITES:
        expect(page.locator(f"#sites-table tr[data-site={site}]")).to_contain_text(other)
    page.screenshot(path=str(artifacts_dir / "console-sites.png"), full_page=True)
    assert console.errors == []
