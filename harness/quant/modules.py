"""Finding and replacing the linears a method quantizes."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import nn

from harness.errors import HarnessError


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Linear`` inside the decoder blocks.

    Decoder blocks live under ``...layers.N`` (llama/mistral/qwen ``model.layers``, OPT
    ``model.decoder.layers``); embeddings and lm_head sit outside and stay full precision.
    """
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in f".{name}"]


def decoder_blocks(model: nn.Module, method: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of each decoder block, in order (``...layers.N``), for the methods that
    work block by block (gptq, awq; ``method`` names the caller in the error)."""
    out = [(n, m) for n, m in model.named_modules()
           if n.rsplit(".", 1)[-1].isdigit() and n.rsplit(".", 2)[-2:-1] == ["layers"]]
    if not out:
        raise HarnessError(f"{method} found no decoder blocks (modules named ...layers.N); it "
                           f"supports llama/mistral/qwen-style models, use rtn or clip otherwise")
    return out


def replace_linears(model: nn.Module, names: list[str],
                    factory: Callable[[str, nn.Module], nn.Module]) -> nn.Module:
    """Replaces each named submodule by ``factory(name, module)`` in place; returns ``model``."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, factory(name, getattr(parent, child)))
    return model


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every module that reports packed storage (QuantLinear, OneBit...)."""
    for name, m in model.named_modules():
        if hasattr(m, "packed_nbytes") and hasattr(m, "num_weights"):
            yield name, m
