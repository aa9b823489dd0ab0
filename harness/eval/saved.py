"""Evaluating a model that was saved: a stored run's packed file, or an exported folder or file.

The run's own evaluation settings are the defaults, so on the held-out text this reproduces
the PPL the run stored.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness import data
from harness.api import NullRecorder
from harness.devices import pick_device
from harness.errors import HarnessError, require_module
from harness.eval.ppl import perplexity
from harness.eval.ppl_data import read_text_file
from harness.export import PACKED_FILE, load_packed, packed_metadata, run_packed_path
from harness.models import load_model


def evaluate_stored_run(store, run, text_file: str | None = None, seq_len: int | None = None,
                        max_tokens: int | None = None, tasks: str | None = None,
                        limit: int | None = None, device: str | None = None,
                        num_fewshot: int | None = None, allow_code_eval: bool = False) -> dict:
    """Perplexity (and optional tasks) of a stored run's model on a text file.

    Defaults are the run's own evaluation settings, so on the held-out text it reproduces the
    PPL the run stored; on ``text_file`` every token is scored unless ``max_tokens`` caps it.
    """
    _check_eval_inputs(text_file, tasks, seq_len, max_tokens, allow_code_eval)
    dev = pick_device(device)
    if run.method == "fp":
        model, tok = load_model(run.model, device=dev)
    else:
        model, tok, _ = load_packed(run_packed_path(store, run), device=dev, model_name=run.model)
    return _evaluate(model, tok, run.spec.get("eval") or {}, text_file, seq_len, max_tokens,
                     tasks, limit, num_fewshot, allow_code_eval)


def evaluate_path(path: str | Path, text_file: str | None = None, seq_len: int | None = None,
                  max_tokens: int | None = None, tasks: str | None = None,
                  limit: int | None = None, device: str | None = None,
                  num_fewshot: int | None = None, allow_code_eval: bool = False) -> dict:
    """:func:`evaluate_stored_run` for an exported model, no database needed: a packed file, a
    folder holding one (``harness export RUN DIR --packed``) or a dense Hugging Face export.
    A packed file's base model must be available locally; its run's evaluation settings are
    the defaults, as for a stored run."""
    path = Path(path)
    packed = path if path.is_file() else path / PACKED_FILE
    if packed.is_file():
        eval_spec = json.loads(packed_metadata(packed).get("spec") or "{}").get("eval") or {}
    elif (path / "config.json").is_file():
        packed, eval_spec = None, {}
    else:
        raise HarnessError(f"{path} holds neither {PACKED_FILE} nor a Hugging Face config.json; "
                           f"pass a folder written by `harness export` or a packed file")
    _check_eval_inputs(text_file, tasks, seq_len, max_tokens, allow_code_eval)
    dev = pick_device(device)
    if packed is None:
        model, tok = load_model(str(path), device=dev)
    else:
        model, tok, _ = load_packed(packed, device=dev)
    return _evaluate(model, tok, eval_spec, text_file, seq_len, max_tokens, tasks, limit,
                     num_fewshot, allow_code_eval)


def _check_eval_inputs(text_file: str | None, tasks: str | None, seq_len: int | None,
                       max_tokens: int | None, allow_code_eval: bool = False) -> None:
    """Bad task names, windows or a missing text file fail before any model work."""
    for flag, value in (("--seq-len", seq_len), ("--max-tokens", max_tokens)):
        if value is not None and value <= 0:
            raise HarnessError(f"{flag} {value}: must be a positive number of tokens")
    if tasks:
        require_module("harness.eval.accuracy", "--tasks").check_task_names(
            tasks.split(","), allow_code_eval=allow_code_eval)
    if text_file and not Path(text_file).is_file():
        raise HarnessError(f"text file {text_file!r} does not exist; pass a readable file")


def _evaluate(model, tok, run_eval: dict, text_file: str | None, seq_len: int | None,
              max_tokens: int | None, tasks: str | None, limit: int | None,
              num_fewshot: int | None = None, allow_code_eval: bool = False) -> dict:
    seq_len = seq_len or run_eval.get("seq_len") or 2048
    if text_file:
        # The reader of `--ppl-data FILE`, so both give one PPL for one file.
        text = read_text_file(text_file)
    else:
        text = data.split_text("eval")
        max_tokens = max_tokens or run_eval.get("max_tokens")
    res = perplexity(model, data.tokenize(tok, text), seq_len=seq_len, max_tokens=max_tokens,
                     progress=True)
    out = {"ppl": res.ppl, "tokens": res.tokens}
    if tasks:
        evaluate_tasks = require_module("harness.eval.accuracy", "--tasks").evaluate_tasks

        out.update(evaluate_tasks(model, tok, tuple(t for t in tasks.split(",") if t), limit,
                                  NullRecorder(), num_fewshot=num_fewshot,
                                  allow_code_eval=allow_code_eval))
    return out
