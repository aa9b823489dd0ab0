"""scripts/shaped-model: a checkpoint folder with LLaMA-2-7B's shapes (here shrunk) and random
weights that the harness loads, plans and counts like any local checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_shaped_folder_loads_and_the_plan_counts_its_parameters(tmp_path):
    from harness.memory_plan import model_shape
    from harness.models import load_model

    out = tmp_path / "shaped"
    argv = [sys.executable, str(ROOT / "scripts" / "shaped-model"), str(out), "--layers", "2",
            "--hidden", "64", "--intermediate", "128", "--heads", "4"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 64
    assert config["intermediate_size"] == 128 and not config["tie_word_embeddings"]
    model, tok = load_model(str(out))
    assert config["vocab_size"] == len(tok)
    assert model_shape(str(out)).params == sum(p.numel() for p in model.parameters())
    again = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwrites a folder


def _script(name: str):
    """scripts/NAME as a module (a script without the .py suffix)."""
    from importlib.machinery import SourceFileLoader
    from importlib.util import module_from_spec, spec_from_loader

    loader = SourceFileLoader(name.replace("-", "_"), str(ROOT / "scripts" / name))
    module = module_from_spec(spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def test_shaped_measure_runs_the_papers_settings_and_projects_their_protocols(tmp_path):
    """What the GPU measurement runs: each paper file's training settings, one run of the
    method at 2 bits, one micro-batch a step, corpus data, few steps; the protocol it projects
    is the file's own (BitDistiller: 200 steps x 16 micro-batches; OneBit: 2000 x 4)."""
    from harness.orchestration.experiments import Experiment
    from harness.orchestration.plan import plan_runs

    sm = _script("shaped-measure")
    model = tmp_path / "shaped-2"  # LLaMA-2-7B's config as scripts/shaped-model writes it
    model.mkdir()
    config = {**_script("shaped-model").LLAMA2_7B, "vocab_size": 49152, "num_hidden_layers": 2}
    (model / "config.json").write_text(json.dumps(config))
    for method, protocol, seq in (("bitdistiller", {"steps": 200, "grad_accum": 16}, 1024),
                                  ("onebit", {"steps": 2000, "grad_accum": 4}, 1024)):
        path, got, _ = sm.experiment_file(method, model, 3, ["train.seq_len=64"], tmp_path)
        assert got == protocol
        [spec] = [s for s in plan_runs(Experiment.from_yaml(path)) if s.method == method]
        train = spec.config["train"]
        assert train["steps"] == 3 and train["grad_accum"] == 1 and train["seq_len"] == 64
        assert spec.config["data"] == "corpus" and spec.model == str(model)
        paper = sm.yaml.safe_load((ROOT / "experiments" / f"llama2-7b-{method}.yaml")
                                  .read_text())["methods"][method]["train"]
        assert train["batch_size"] == paper["batch_size"] and train["lr"] == paper["lr"]
        assert paper["seq_len"] == seq
        plan = sm.planned(path, method, "cuda")
        assert plan["phases"]["train"] > 0 and plan["total"] >= plan["phases"]["train"]
    assert sm.fit([2, 4], [10.0, 16.0]) == (4.0, 3.0)  # fixed + per layer x layers
