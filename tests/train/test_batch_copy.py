"""Batches: which rows each (step, micro) reads, and that they reach the device unchanged, from
pinned memory on CUDA."""

from collections import Counter

import pytest
import torch

from harness.train.config import TrainConfig
from harness.train.trainer import _to_device, batch_at

N_ROWS, WIDTH = 10, 65


def _data() -> torch.Tensor:
    """Row r holds 100 r, 100 r + 1, ...: every value names its row."""
    return torch.arange(N_ROWS).unsqueeze(1) * 100 + torch.arange(WIDTH)


def _rows(rows: list[int]) -> torch.Tensor:
    return torch.tensor([[100 * r + j for j in range(WIDTH)] for r in rows])


# Micro-batch number k = step * grad_accum + micro starts at row k * batch_size and wraps
# around the data; hand-written for batch_size 4 and for batch_size 2 with 3 micro-batches.
ROWS_BS4 = {(0, 0): [0, 1, 2, 3], (1, 0): [4, 5, 6, 7], (2, 0): [8, 9, 0, 1],
            (3, 0): [2, 3, 4, 5], (5, 0): [0, 1, 2, 3]}
ROWS_BS2_ACC3 = {(0, 0): [0, 1], (0, 1): [2, 3], (0, 2): [4, 5], (1, 0): [6, 7],
                 (1, 1): [8, 9], (1, 2): [0, 1], (2, 0): [2, 3], (4, 1): [6, 7]}


@pytest.mark.parametrize("cfg,expected", [
    (TrainConfig(batch_size=4), ROWS_BS4),
    (TrainConfig(batch_size=2, grad_accum=3), ROWS_BS2_ACC3),
])
def test_batch_at_reads_the_rows_of_its_step_and_micro_batch(cfg, expected):
    data = _data()
    for (step, micro), rows in expected.items():
        assert torch.equal(batch_at(data, step, micro, cfg), _rows(rows)), (step, micro)


def test_consecutive_batches_are_distinct_and_cover_the_data_evenly():
    data, cfg = _data(), TrainConfig(batch_size=4)
    # 5 steps x 4 rows = 2 passes over 10 rows: every row twice, whatever the wrap-around.
    seen = Counter(int(row[0]) // 100 for step in range(5) for row in batch_at(data, step, 0, cfg))
    assert seen == {r: 2 for r in range(N_ROWS)}
    # ... and no two of those 5 steps repeat a batch (the cycle is 5 steps long)
    assert len({tuple(batch_at(data, step, 0, cfg)[:, 0].tolist()) for step in range(5)}) == 5


def test_cpu_batches_do_not_alias_the_data_or_each_other():
    """The trainer keeps a batch while the next one is made; nothing written later (the data
    tensor, another batch) may show through it."""
    data, cfg = _data(), TrainConfig(batch_size=4)
    batches = [_to_device(batch_at(data, step, 0, cfg), "cpu") for step in range(4)]
    data.fill_(-1)
    batches[1].fill_(-2)
    for step in (0, 2, 3):
        assert batches[step].device.type == "cpu" and batches[step].dtype == torch.int64
        assert torch.equal(batches[step], _rows(ROWS_BS4[(step, 0)])), step


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_batches_reach_the_device_unchanged(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    data = _data()
    cfg = TrainConfig(steps=3, batch_size=4)
    batches = [_to_device(batch_at(data, step, 0, cfg), device) for step in range(3)]
    # the next copies must not overwrite a batch still on its way (pinned buffers are reused)
    for step, ids in enumerate(batches):
        assert ids.device.type == device
        assert torch.equal(ids.cpu(), _rows(ROWS_BS4[(step, 0)]))
