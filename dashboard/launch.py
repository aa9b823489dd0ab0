"""``harness dashboard``: start Streamlit on 127.0.0.1 over the results database, read-only.

SQLite databases are opened with ``mode=ro``. For PostgreSQL (or another server) the dashboard
never writes, but to make that a guarantee connect with a role that only has ``SELECT``::

    CREATE ROLE dashboard LOGIN PASSWORD '...';
    GRANT SELECT ON ALL TABLES IN SCHEMA public TO dashboard;
    harness dashboard --db postgresql+psycopg://dashboard@host/harness
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from dashboard.queries import sqlite_path
from harness.errors import HarnessError
from harness.interrupts import explain
from harness.store import DEFAULT_DB, Store

APP = Path(__file__).resolve().with_name("app.py")


def db_url_from_argv(argv: list[str] | None = None) -> str:
    """The app's database: ``--db URL`` (after Streamlit's ``--``), else ``$LOWBIT_DB``, else
    ``$HARNESS_DB``, else the default."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--db")
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return args.db or os.environ.get("LOWBIT_DB") or os.environ.get("HARNESS_DB") or DEFAULT_DB


def check_db(db_url: str) -> None:
    """Fails early, in one line, when the database is missing or unusable.

    Raises:
        HarnessError: no SQLite file at the path, or the URL cannot be opened read-only.
    """
    try:
        path = sqlite_path(db_url)
    except Exception:  # malformed URL: Store gives the one-line message
        path = None
    if path is not None and not path.exists():
        raise HarnessError(f"no database at {path}; run `harness run --methods rtn` first "
                           f"(or pass --db with an existing database)")
    Store(db_url, readonly=True).engine.dispose()


def check_port(port: int) -> None:
    """Fails in one line when something already listens on 127.0.0.1:``port`` (Streamlit
    would print its own complaint after ours announced the address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Tornado binds
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise HarnessError(f"port {port} on 127.0.0.1 is in use; pass --port with a free "
                               f"one") from None


def command(db_url: str, port: int) -> list[str]:
    """The ``streamlit run`` argument list (no shell involved)."""
    return [sys.executable, "-m", "streamlit", "run", str(APP),
            "--server.address", "127.0.0.1", "--server.port", str(int(port)),
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--", "--db", db_url]


def launch(db_url: str, port: int = 8501) -> int:
    """Runs the dashboard in the foreground until interrupted; returns its exit code.

    Raises:
        HarnessError: missing database (see :func:`check_db`) or a bad port.
    """
    if not 0 < int(port) < 65536:
        raise HarnessError(f"port {port} is out of range; pass --port between 1 and 65535")
    check_db(db_url)
    check_port(int(port))
    print(f"dashboard on http://127.0.0.1:{port} (read-only: {db_url}); Ctrl+C stops it",
          file=sys.stderr)
    proc = subprocess.Popen(command(db_url, port))
    try:
        return proc.wait()
    except KeyboardInterrupt as exc:
        # Ctrl+C reaches Streamlit too (same process group): let it shut down cleanly. A
        # SIGTERM (harness.interrupts raises it here) was sent to us alone: pass it on.
        if explain(exc).exit_code != 128 + signal.SIGTERM:
            try:
                proc.wait(timeout=10)
                return 0
            except subprocess.TimeoutExpired:
                pass
        proc.terminate()
        proc.wait()
        return 0
