"""Slow tier: GPTQ on the embedded SmolLM2-135M against RTN, layer by layer.

GPTQ minimises each linear's output error on its calibration inputs, ``tr((W - Q) H (W - Q)^T)
/ 2``, which RTN's W_q (same format, fp16 scales) is one candidate for: on every linear GPTQ's
error must be at most RTN's. The method records both errors as layer stats on the same H.

The first BLOCKS decoder blocks (GPTQ is sequential: block k sees only blocks before it, so
these are exactly the full model's first blocks), to keep the suite's budget; the quick-profile
results run checks all 30 blocks (docs/RESULTS.md, its layer stats).
"""

import pytest
import torch

from harness.api import NullRecorder, RunContext

pytestmark = pytest.mark.slow

SAMPLES, SEQ_LEN = 8, 256  # 2,048 tokens >= 1,536 (down_proj's inputs): a full-rank H
BLOCKS = 4


class _LayerStats(NullRecorder):
    def __init__(self):
        self.stats: dict[tuple[str, str], dict[str, float]] = {}

    def layer_stat(self, layer, module, stat, value):
        self.stats.setdefault((layer, module), {})[stat] = value


def test_gptq_output_error_is_at_most_rtn_on_every_layer():
    from harness import data
    from harness.models import load_model
    from methods.gptq import GPTQConfig, gptq_model

    model, tok = load_model("smollm2-135m")
    model.model.layers = model.model.layers[:BLOCKS]
    batches = data.token_blocks(tok, "calibration", SEQ_LEN, SAMPLES, seed=0)
    recorder = _LayerStats()
    ctx = RunContext(spec=type("Spec", (), {"seed": 0})(), device=torch.device("cpu"),
                     tokenizer=tok, recorder=recorder, run_dir=None,
                     calibration=lambda: batches)
    config = GPTQConfig(bits=3, group_size=64, calib_samples=SAMPLES, calib_seq_len=SEQ_LEN)
    gptq_model(model, config, ctx)

    assert len(recorder.stats) == 7 * BLOCKS
    worse = {k: v for k, v in recorder.stats.items()
             if not v["gptq_output_err"] <= v["rtn_output_err"]}
    assert not worse, worse
    ratios = [v["gptq_output_err"] / v["rtn_output_err"] for v in recorder.stats.values()]
    assert sum(ratios) / len(ratios) < 0.8  # and by a clear margin on average
