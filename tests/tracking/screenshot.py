"""Screenshot a job's HTML report in Debian's headless Chromium (how `docs/report.png` is made):

    .venv/bin/fedsilo demo --workdir /tmp/demo
    .venv/bin/python -m tests.tracking.screenshot /tmp/demo/reports/<job>/report.html docs/report.png
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.conftest import CHROMIUM


def screenshot(report: Path, out: Path, width: int = 1100) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(report.resolve().as_uri())
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]))
