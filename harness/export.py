"""Saving, loading and exporting quantized models.

The packed file (safetensors) holds what a method produced: every quantized module's packed
tensors plus the full-precision parameters a method may have changed (norms, biases). The
embeddings and lm_head are never quantized or trained, so they are not copied into each run's
file; the loader takes them from the base model named in the file's metadata and checks that
model is the one the file was made from.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from harness.errors import HarnessError
from harness.models import load_model
from harness.paths import replaced
from harness.quant.linear import QuantLinear
from harness.quant.modules import quantized_modules, replace_linears
from harness.quant.onebit import OneBitLinear

PACKED_FILE = "packed.safetensors"
FORMAT_VERSION = "1"


def _is_base_only(name: str) -> bool:
    return "embed_tokens" in name or name.startswith("lm_head") or "embed_positions" in name


def _module_specs(model: nn.Module) -> dict[str, dict]:
    specs = {}
    for name, module in quantized_modules(model):
        specs[name] = {"type": type(module).__name__, **module.packed_spec()}
    return specs


def _base_fingerprint(model: nn.Module) -> str:
    """A cheap identity of the base model: shapes and a checksum of the embedding."""
    emb = model.get_input_embeddings().weight
    return f"{tuple(emb.shape)}:{float(emb.detach().double().sum()):.6e}"


def save_packed(model: nn.Module, spec, run_dir: Path) -> Path:
    """Writes ``run_dir/packed.safetensors`` and returns its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
               if not _is_base_only(k)}
    meta = {"format_version": FORMAT_VERSION, "model": spec.model, "run_key": spec.run_key,
            "spec": spec.canonical_json(), "modules": json.dumps(_module_specs(model)),
            "base_fingerprint": _base_fingerprint(model)}
    path = run_dir / PACKED_FILE
    with replaced(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def _module_class(kind: str) -> type:
    if kind == "QuantLinear":
        return QuantLinear
    if kind == "OneBitLinear":
        return OneBitLinear
    raise HarnessError(f"packed file holds an unknown module type {kind!r}; upgrade lowbit-harness")


def _empty_module(spec: dict) -> nn.Module:
    return _module_class(spec["type"]).from_packed_spec(spec)


def packed_metadata(path: str | Path) -> dict[str, str]:
    """The packed file's metadata (model, run key, spec, modules), without loading tensors.

    Raises:
        HarnessError: missing file, or not a lowbit-harness packed file.
    """
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"packed file {path} does not exist; rerun the run or check --output-dir")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as exc:
        raise HarnessError(f"{path} is not a readable safetensors file ({exc}); export it "
                           f"again with `harness export RUN DIR --packed`") from None
    if "modules" not in meta:
        raise HarnessError(f"{path} is not a lowbit-harness packed file (no metadata)")
    return meta


def load_packed(path: str | Path, device: str | torch.device = "cpu", model_name: str | None = None):
    """Rebuilds a packed model from ``path``: base model + packed modules + saved parameters.

    Raises:
        HarnessError: missing file, or a file made from another base model.
    """
    path = Path(path)
    meta = packed_metadata(path)
    name = model_name or meta["model"]
    model, tok = load_model(name, device=device)
    if _base_fingerprint(model) != meta.get("base_fingerprint"):
        raise HarnessError(f"{path} was made from model {meta['model']!r}, not {name!r}; "
                           f"load it with the model it was quantized from")
    specs = json.loads(meta["modules"])
    replace_linears(model, list(specs), lambda n, _lin: _empty_module(specs[n]))
    state = load_file(str(path), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _is_base_only(k)]
    if missing or unexpected:
        raise HarnessError(f"{path} does not match model {name!r} (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}); load it with its own base model")
    return model.to(device).eval(), tok, meta


def run_packed_path(store, run) -> Path:
    """The packed file of a finished quantized run."""
    path = store.artifacts(run.id).get("packed")
    if run.method == "fp":
        raise HarnessError(f"run {run.run_key} is the unquantized reference (fp); export the base "
                           f"model {run.model!r} directly")
    if run.status != "finished" or not path:
        raise HarnessError(f"run {run.run_key} has no packed model (status {run.status}); "
                           f"finish it first with `harness run`")
    return Path(path)


def export_run(store, run, out_dir: Path, packed_only: bool = False) -> list[Path]:
    """Writes the packed file and (unless ``packed_only``) a plain HF checkpoint to ``out_dir``.

    The HF checkpoint holds dequantized weights that ``AutoModelForCausalLM.from_pretrained``
    loads without this package. OneBit layers are not linear maps of a dense weight (a
    LayerNorm sits inside), so they export as the packed file only.
    """
    src = run_packed_path(store, run)
    if not packed_only:  # refused before anything is written
        kinds = {spec["type"] for spec in json.loads(packed_metadata(src)["modules"]).values()}
        if dense_less := sorted(k for k in kinds if not hasattr(_module_class(k), "to_linear")):
            raise HarnessError(f"run {run.run_key} uses {', '.join(dense_less)}, which has no "
                               f"dense Hugging Face form; use `harness export {run.run_key} DIR "
                               f"--packed` and evaluate it with `harness eval DIR`")
    if out_dir.exists() and not out_dir.is_dir():
        raise HarnessError(f"export folder {str(out_dir)!r} is a file; pass a folder")
    started = time.time() - 1  # file times may be coarser than the clock
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out_dir / PACKED_FILE)
        if not packed_only:
            model, tok, _meta = load_packed(src, model_name=run.model)
            modules = dict(quantized_modules(model))
            replace_linears(model, list(modules), lambda n, _m: modules[n].to_linear())
            model.save_pretrained(out_dir, safe_serialization=True)
            tok.save_pretrained(out_dir)
    except OSError as exc:
        raise HarnessError(f"cannot write the export to {str(out_dir)!r} "
                           f"({exc.strerror or type(exc).__name__}); pass a writable folder") from None
    if packed_only:
        return [out_dir / PACKED_FILE]
    # every file this export wrote: the packed file and the HF checkpoint's (config, weights,
    # tokenizer), new or rewritten
    return sorted(p for p in out_dir.iterdir() if p.is_file() and p.stat().st_mtime >= started)

