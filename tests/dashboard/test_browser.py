"""The real thing once: `harness dashboard` in a subprocess, loaded in headless Chromium."""

from __future__ import annotations

import pytest
import websockets.sync.client  # noqa: F401  (Streamlit brings it; imported, never skipped)

from dashboard import browser

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


@pytest.fixture
def chromium():
    path = browser.find_chromium()
    if not path:
        pytest.skip("chromium is not installed (apt-get install chromium; `make test-deps`)")
    return path


def test_dashboard_in_chromium(chromium, fake_db, tmp_path):
    url, _ = fake_db
    with browser.serve(url, log=tmp_path / "server.log") as base, \
            browser.Page(chromium=chromium) as page:
        page.goto(base + "/")
        text = page.wait_streamlit("Leaderboard", timeout=90)
        shot = page.screenshot(tmp_path / "leaderboard.png")
        # the table itself is a canvas grid: check it exists, and the text around it
        assert page.eval("!!document.querySelector('[data-testid=\"stDataFrame\"]')")
        assert "8 of 8 runs" in text and "1 failed" in text and "Open run detail" in text
        assert shot.stat().st_size > 10_000 and shot.read_bytes()[:4] == b"\x89PNG"
        page.goto(base + "/?page=detail&run=" + _failed_key(url))
        text = page.wait_streamlit("This run failed", timeout=90)
        assert "loss became nan" in text
        page.screenshot(tmp_path / "detail.png")


def _failed_key(url: str) -> str:
    from harness.store import Store

    return Store(url, readonly=True).runs(status="failed")[0].run_key
