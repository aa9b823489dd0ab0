"""The core imports none of the heavy optional packages: a run, training or a perplexity
loads them only where a feature asks (Ray scheduler, dashboard, --tasks, CUDA kernels)."""

import subprocess
import sys

HEAVY = ("ray", "streamlit", "plotly", "lm_eval", "triton")


def test_core_modules_import_no_heavy_optional_package():
    code = ("import sys; import harness.orchestration.runner, harness.train.trainer, harness.eval.ppl, "
            "harness.eval.saved, harness.store; "
            f"loaded = [m for m in {HEAVY!r} if m in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
