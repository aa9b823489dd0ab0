"""Batches reach the training device unchanged, from pinned memory on CUDA."""

import pytest
import torch

from harness.train.config import TrainConfig
from harness.train.trainer import _batch_at, _to_device


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_batches_reach_the_device_unchanged(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    data = torch.randint(0, 49152, (10, 65))
    cfg = TrainConfig(steps=3, batch_size=4)
    batches = [_to_device(_batch_at(data, step, 0, cfg), device) for step in range(3)]
    # the next copies must not overwrite a batch still on its way (pinned buffers are reused)
    for step, ids in enumerate(batches):
        assert ids.device.type == device
        assert torch.equal(ids.cpu(), _batch_at(data, step, 0, cfg))
