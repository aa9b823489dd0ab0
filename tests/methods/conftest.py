"""The post-training baselines' CLI checks: one quick tiny-llama run, listed back."""

from __future__ import annotations

import json

import pytest

QUICK = ["--model", "tiny-llama", "--max-eval-tokens", "1024", "--seq-len", "128"]


@pytest.fixture
def run_quick(cli, tmp_path):
    """``run_quick("gptq,hqq")``: `harness run` at 3 bits on tiny-llama without fp or tasks,
    then `harness list --json`; returns the runs by method."""

    def run(methods: str) -> dict[str, dict]:
        db = f"sqlite:///{tmp_path / 'x.db'}"
        code, _, err = cli("run", "--methods", methods, "--bits", "3", *QUICK, "--tasks", "",
                           "--no-fp", "--db", db, "--output-dir", tmp_path / "runs")
        assert code == 0, err
        code, out, _ = cli("list", "--json", "--db", db)
        return {r["method"]: r for r in json.loads(out)}

    return run
