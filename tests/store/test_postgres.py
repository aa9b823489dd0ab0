"""The store and `harness run` against a real PostgreSQL server started in a temp dir.

Needs Debian's server binaries (``apt-get install postgresql``; ``make test-deps`` does it) and
``psycopg`` (the ``postgres`` extra). PostgreSQL refuses to run as root, so as root the server
runs as the ``postgres`` user through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg  # noqa: F401  (a dev dependency: imported, never skipped)
import pytest

from tests.helpers.net import free_port

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parents[2]


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(dirs[-1]) if dirs else None


@pytest.fixture(scope="module")
def pg_url(tmp_path_factory):
    bindir = _bin_dir()
    if bindir is None or not (bindir / "initdb").exists():
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")
    prefix: list[str] = []
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        if runuser is None:
            pytest.skip("running as root without runuser; PostgreSQL refuses to run as root")
        prefix = [runuser, "-u", "postgres", "--"]
    root = tmp_path_factory.mktemp("pg")
    data = root / "data"
    if prefix:
        shutil.chown(root, "postgres")
        os.chmod(root, 0o755)
        for parent in list(root.parents)[:3]:  # pytest temp dirs are 0700
            os.chmod(parent, os.stat(parent).st_mode | 0o711)
    port = free_port()
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "harness",
                    "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
    subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l",
                    str(root / "log"), "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
                    "start"], check=True, capture_output=True)
    try:
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U",
                        "harness", "harness"], check=True, capture_output=True)
        yield f"postgresql+psycopg://harness@127.0.0.1:{port}/harness"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True)


def test_store_round_trip(pg_url):
    from harness.orchestration.plan import build_spec
    from harness.store import Store

    store = Store(pg_url)
    spec = build_spec("tiny-llama", "rtn", {"bits": 2, "group_size": 32}, "quick", 0,
                      {"max_tokens": 64, "seq_len": 32, "tasks": ()})
    run = store.begin_run(spec, store.experiment_id("pg-test", "x: 1"), device="cpu")
    store.add_metric(run.id, "ppl", 12.5, extra={"tokens": 64})
    store.add_metric(run.id, "ppl", 11.5)  # upsert, not a second row
    store.add_train_step(run.id, 1, 2.0, 1e-5, 100.0)
    store.end_run(run.id, "finished", wall_s=1.0)
    again = Store(pg_url, readonly=True)
    got = again.get_run(run.run_key)
    assert got.status == "finished" and again.metric_dict(got.id) == {"ppl": 11.5}
    assert again.find_run(spec.spec_hash()).id == run.id


def test_harness_run_against_postgres(pg_url, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    res = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", "--methods", "rtn", "--model", "tiny-llama",
         "--bits", "2", "--group-size", "32", "--max-eval-tokens", "64", "--seq-len", "32",
         "--tasks", "", "--scheduler", "inline", "--db", pg_url, "--output-dir", tmp_path],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    from harness.store import Store

    store = Store(pg_url, readonly=True)
    done = [r for r in store.runs("finished") if r.model == "tiny-llama" and r.method in
            ("fp", "rtn") and r.spec["eval"]["max_tokens"] == 64]
    assert {r.method for r in done} == {"fp", "rtn"}
    assert all("ppl" in store.metric_dict(r.id) for r in done)
