"""dashboard/launch.py: the `harness dashboard` entry point (no server started here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dashboard import launch
from harness.errors import HarnessError


def test_command_is_an_argument_list():
    cmd = launch.command("sqlite:///runs/x.db", 8600)
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"]
    assert cmd[4].endswith("dashboard/app.py")
    for flag, value in (("--server.address", "127.0.0.1"), ("--server.port", "8600"),
                        ("--server.headless", "true"), ("--browser.gatherUsageStats", "false")):
        assert cmd[cmd.index(flag) + 1] == value
    assert cmd[-3:] == ["--", "--db", "sqlite:///runs/x.db"]


def test_missing_database_is_one_line_exit_2(cli, tmp_path):
    code, out, err = cli("dashboard", "--db", f"sqlite:///{tmp_path / 'none.db'}")
    assert code == 2
    assert err.startswith("error: no database at ") and err.count("\n") == 1
    assert "harness run --methods rtn" in err
    assert not (tmp_path / "none.db").exists()  # read-only: nothing created


def test_bad_url_and_port(tmp_path):
    with pytest.raises(HarnessError):
        launch.launch("not a url", 8501)
    with pytest.raises(HarnessError, match="port"):
        launch.launch(f"sqlite:///{tmp_path / 'x.db'}", 70000)


def test_port_in_use_is_one_line_before_streamlit_starts(monkeypatch, fake_db):
    import socket

    monkeypatch.setattr(subprocess, "Popen", lambda cmd: pytest.fail("Streamlit started"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(HarnessError, match=f"port {busy.getsockname()[1]} .* in use"):
            launch.launch(fake_db[0], busy.getsockname()[1])


def test_read_only_url_error_asks_for_an_existing_database():
    with pytest.raises(HarnessError, match="pass an existing --db") as err:
        launch.launch("bogus://x", 8501)
    assert "writable" not in str(err.value)


def test_launch_runs_streamlit(monkeypatch, fake_db):
    seen = {}

    class FakePopen:
        def __init__(self, cmd):
            seen["cmd"] = cmd

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    assert launch.launch(fake_db[0], 8555) == 0
    assert seen["cmd"][-1] == fake_db[0] and "8555" in seen["cmd"]


def test_db_url_from_argv(monkeypatch):
    monkeypatch.delenv("HARNESS_DB", raising=False)
    monkeypatch.setenv("LOWBIT_DB", "sqlite:///env.db")
    assert launch.db_url_from_argv(["--db", "sqlite:///x.db"]) == "sqlite:///x.db"
    assert launch.db_url_from_argv([]) == "sqlite:///env.db"
    monkeypatch.delenv("LOWBIT_DB")
    from harness.store import DEFAULT_DB

    assert launch.db_url_from_argv([]) == DEFAULT_DB


def test_sigterm_stops_streamlit_at_once(monkeypatch, fake_db):
    """SIGTERM reaches only `harness dashboard`, not its Streamlit child: it is passed on."""
    import os
    import signal
    import threading
    import time

    from harness.interrupts import installed

    child, real_popen = {}, subprocess.Popen

    def sleeper(_cmd):  # stands in for Streamlit: a child that would run for a minute
        child["proc"] = real_popen([sys.executable, "-c", "import time; time.sleep(60)"])
        return child["proc"]

    monkeypatch.setattr(subprocess, "Popen", sleeper)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    start = time.monotonic()
    with installed():
        assert launch.launch(fake_db[0], 8555) == 0
    assert time.monotonic() - start < 8  # not the 10 s grace a Ctrl+C gets
    assert child["proc"].returncode == -signal.SIGTERM
