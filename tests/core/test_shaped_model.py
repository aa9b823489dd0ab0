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
