"""The real thing: `harness dashboard` in a subprocess, loaded in headless Chromium."""

from __future__ import annotations

import re
import time

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


# Per plotly chart on the page: the vertical whiskers plotly drew, as each path's (top, bottom)
# in pixels. Bars put ``g.errorbar > path.yerror`` inside their ``g.trace.bars``, scatter traces
# inside a ``g.errorbars`` group (checked in Chromium with plotly.js 3 / Streamlit 1.67).
WHISKERS_JS = """JSON.stringify(Array.from(document.querySelectorAll(
    '[data-testid="stPlotlyChart"]')).map(c => ({
  bars: Array.from(c.querySelectorAll('g.trace.bars g.errorbar path.yerror'))
      .map(p => p.getAttribute('d')),
  points: Array.from(c.querySelectorAll('g.errorbars g.errorbar path.yerror'))
      .map(p => p.getAttribute('d')),
})))"""


def _span(d: str) -> float:
    """Pixel length of a whisker path ``M x,top h.. m..,0 V bottom ...``."""
    top = float(re.match(r"M[-\d.e]+,([-\d.e]+)", d).group(1))
    bottom = float(re.search(r"V([-\d.e]+)", d).group(1))
    return abs(bottom - top)


def test_compare_page_draws_whiskers_and_marks_noise(chromium, noise_db, tmp_path):
    """fp, the qat seed group, bitdistiller and clip have intervals, rtn (stored before them)
    has none: the Pareto chart has exactly four whiskers, none of zero length; the bars have
    PPL (4) + PPL/FP (4) + accuracy (3) whiskers, size none (no uncertainty, seeds agree); the
    accuracy bars 3 runs x 2 tasks."""
    import json

    from dashboard import queries

    url, _ = noise_db
    with browser.serve(url, log=tmp_path / "server.log") as base, \
            browser.Page(chromium=chromium) as page:
        page.goto(base + "/?page=compare")
        text = page.wait_streamlit("Ranking within noise", timeout=90)
        deadline, charts = time.monotonic() + 30, []
        while time.monotonic() < deadline:  # plotly may still be drawing after the run ends
            charts = json.loads(page.eval(WHISKERS_JS) or "[]")
            if len(charts) == 3 and all(c["bars"] or c["points"] for c in charts):
                break
            time.sleep(0.5)
        page.screenshot(tmp_path / "compare.png")
        assert [(len(c["bars"]), len(c["points"])) for c in charts] == [(11, 0), (0, 4), (6, 0)]
        assert all(_span(d) > 0.5 for c in charts for d in c["bars"] + c["points"])
        assert queries.WITHIN_NOISE in text
        line = next(x for x in text.splitlines() if "best PPL" in x)
        assert "(3 seeds)" in line and "bitdistiller" in line.split(queries.WITHIN_NOISE)[1]
        assert "31.10 ± 0.46 (n=3)" in line
