"""Drive the dashboard in headless Chromium: serve it, then screenshot or dump a page.

Used by the ``browser`` test tier and ``scripts/dashboard-screenshots``. Needs only the
Chromium binary and ``websockets`` (already a Streamlit dependency): no Selenium, no Playwright.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary (``$CHROMIUM`` first), or None."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(db_url: str, port: int | None = None, timeout: float = 90.0,
          log: Path | None = None) -> Iterator[str]:
    """Runs ``harness dashboard --db URL --port PORT`` and yields its base URL once healthy.

    Raises:
        RuntimeError: the server exited or did not answer within ``timeout`` (with its log).
    """
    port = port or free_port()
    log = log or Path(tempfile.mkstemp(prefix="dashboard-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "harness.cli", "dashboard", "--db", db_url, "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"dashboard exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"dashboard not up after {timeout:.0f}s:\n{log.read_text()}")
            time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            # the CLI and the Streamlit child share a session: stop both, then wait
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


class Page:
    """One headless Chromium tab driven over the DevTools protocol.

    Uses the ``websockets`` sync client (a Streamlit dependency) instead of Selenium: the
    one-shot ``chromium --screenshot`` cannot wait for Streamlit, which renders over a websocket
    after the page has loaded.
    """

    def __init__(self, width: int = 1400, height: int = 1000,
                 chromium: str | None = None) -> None:
        from websockets.sync.client import connect  # optional: only screenshots need it

        chromium = chromium or find_chromium()
        if not chromium:
            raise RuntimeError("no chromium binary; apt-get install chromium (or set $CHROMIUM)")
        self.width, self.height = width, height
        self._profile = tempfile.TemporaryDirectory(prefix="dash-chromium-")
        args = [chromium, "--headless", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
                "--no-first-run", "--no-default-browser-check", "--disable-dev-shm-usage",
                "--remote-debugging-port=0", "--remote-allow-origins=*",
                f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self._proc = subprocess.Popen(args + ["about:blank"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self._profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list",
                                                    timeout=10).read())
        ws = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
        self._ws = connect(ws, max_size=None, open_timeout=10)
        self._id = 0
        self.call("Page.enable")
        self.resize(width, height)

    def call(self, method: str, **params):
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv(timeout=60))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def resize(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def eval(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return res.get("result", {}).get("value")

    def text(self) -> str:
        return self.eval("document.body ? document.body.innerText : ''") or ""

    def wait_streamlit(self, contains: str | None = None, timeout: float = 60.0,
                       settle: float = 2.0) -> str:
        """Waits until Streamlit finished the script run (no status widget, no skeleton) and,
        if given, ``contains`` is on the page; then ``settle`` seconds for plotly to draw.

        Returns:
            The page's visible text.

        Raises:
            TimeoutError: with the text seen last.
        """
        busy = ("!!document.querySelector('[data-testid=\"stStatusWidget\"],"
                "[data-testid=\"stSkeleton\"]') || "
                "!document.querySelector('[data-testid=\"stApp\"]')")
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text()
            if (contains is None or contains in text) and not self.eval(busy) and text.strip():
                time.sleep(settle)
                if not self.eval(busy):
                    return self.text()
            time.sleep(0.5)
        raise TimeoutError(f"page not ready after {timeout:.0f}s; it showed: {text[:500]!r}")

    def screenshot(self, path: Path, full: bool = True, max_height: int = 6000) -> Path:
        """PNG of the page; ``full`` grows the viewport to Streamlit's scroll height first."""
        if full:
            h = self.eval("Math.max(document.body.scrollHeight, ...Array.from(document."
                          "querySelectorAll('[data-testid=\"stMain\"], section.main, "
                          "[data-testid=\"stAppViewContainer\"]')).map(e => e.scrollHeight))")
            if h and int(h) > self.height:
                self.resize(self.width, min(int(h) + 40, max_height))
                time.sleep(1.5)  # plotly re-lays out on resize
        data = self.call("Page.captureScreenshot", format="png")["data"]
        if full:
            self.resize(self.width, self.height)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        ws = getattr(self, "_ws", None)
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.close()
        # Chromium's helpers (renderer, crashpad) share its session and may still write
        # into the profile after the browser process exits: stop the whole group first.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, 15)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, 9)
        self._proc.wait()
        # a helper killed mid-write can leave files behind for a moment; it is a temp dir
        for _ in range(20):
            with contextlib.suppress(OSError):
                self._profile.cleanup()
            if not os.path.exists(self._profile.name):
                break
            time.sleep(0.25)

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
