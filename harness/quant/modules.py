"""Finding and replacing the linears a method quantizes (METHODS.md, "Shared").

Every ``nn.Linear`` inside the decoder blocks is quantized; embeddings, the final norm and
``lm_head`` stay full precision. Decoder blocks are the ``ModuleList`` called ``layers``:
llama/mistral/qwen ``model.layers.N``, OPT ``model.decoder.layers.N``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from torch import nn

from harness.errors import HarnessError


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Linear`` inside the decoder blocks, in module order.

    Args:
        model: a causal LM (Hugging Face layout).

    Returns:
        Names such as ``model.layers.0.self_attn.q_proj``; never embeddings or ``lm_head``.
    """
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in f".{name}"
            and not name.split(".")[-1].startswith(("lm_head", "embed"))]


def replace_linears(model: nn.Module, names: Iterable[str],
                    factory: Callable[[str, nn.Linear], nn.Module]) -> nn.Module:
    """Replaces each named submodule by ``factory(name, module)``, in place.

    Args:
        model: the model to modify.
        names: qualified submodule names (e.g. from :func:`decoder_linear_names`).
        factory: builds the replacement from the name and the current module.

    Returns:
        ``model`` itself.

    Raises:
        HarnessError: a name that is not a submodule of ``model``.
    """
    for name in names:
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            current = getattr(parent, child)
        except AttributeError:
            raise HarnessError(f"model has no submodule {name!r}; pass names from "
                               f"decoder_linear_names(model)") from None
        setattr(parent, child, factory(name, current))
    return model


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every module reporting packed storage.

    Any module with a ``packed_nbytes()`` method and a ``num_weights`` attribute counts
    (QuantLinear, OneBitLinear, a plugin's own layer); modules nested inside one are skipped
    so nothing is counted twice.
    """
    outer: list[str] = []
    for name, m in model.named_modules():
        if not (hasattr(m, "packed_nbytes") and hasattr(m, "num_weights")):
            continue
        if any(name.startswith(o + ".") for o in outer):
            continue
        outer.append(name)
        yield name, m
