"""One Ray head for the session's multi-run tests: each test joins it with ``--ray-address``
(the path a user with an existing cluster takes) instead of paying for a local start of its
own. The smoke test still starts Ray the default way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.net import RAY_TOKEN_ENV, free_port


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory) -> str:
    """Address of a local Ray head started with ``ray start --head --block``; terminating that
    process stops every Ray process it started (it owns them through ``--block``)."""
    ray_cli = Path(sys.executable).with_name("ray")
    ray_cli = str(ray_cli) if ray_cli.exists() else shutil.which("ray")
    assert ray_cli, "the `ray` command of the Ray package is missing"
    port = free_port()
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0",
               **RAY_TOKEN_ENV)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [ray_cli, "start", "--head", "--block", f"--port={port}",
             f"--num-cpus={os.cpu_count() or 1}",
             "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text():
            assert proc.poll() is None, f"ray start failed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"ray start hung:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
