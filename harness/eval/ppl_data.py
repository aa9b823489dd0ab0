"""The texts perplexity is measured on: the held-out plays, the papers' standard sets, user files.

An entry names one evaluation text; :func:`parse_ppl_data` turns what the user typed into
canonical entries, which are part of a run's identity (stored with the run, compared across
runs), so each canonical entry must always mean the same token stream:

- ``shakespeare``: the embedded held-out plays (:func:`harness.data.split_ids`, unchanged).
- ``wikitext2``, ``ptb``, ``c4``: the test sets of GPTQ / OmniQuant / BitDistiller, built the
  way their ``datautils.py`` builds them (IST-DASLab/gptq ``get_wikitext2``, ``get_ptb_new``,
  ``get_c4``), so numbers compare with the papers' tables.
- ``file:<absolute path>@<sha256[:16]>``: a .txt / .jsonl / .parquet file; the digest of its
  bytes is in the entry, so an edited file is another evaluation.
- ``hf:DATASET:CONFIG:SPLIT:FIELD``: any Hugging Face dataset, FIELD joined like wikitext2.

Everything is offline: the standard sets come from the local Hugging Face cache only, and a
set that is not cached is a one-line error giving the command that fills the cache once.
``datasets`` / ``pyarrow`` are imported lazily, so the core imports without them.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import json
import logging
import random
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from harness import data
from harness.errors import HarnessError
from harness.eval.hf_offline import MISSING_DATA_ERRORS, offline_env

SHAKESPEARE = "shakespeare"
WIKITEXT2 = "wikitext2"
C4 = "c4"
PTB = "ptb"
NAMES = (SHAKESPEARE, WIKITEXT2, C4, PTB)
DEFAULT = (SHAKESPEARE,)

FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
# What the error messages list as valid entries.
FORMS = (f"{', '.join(NAMES)}, a FILE ({' / '.join(FILE_SUFFIXES)}; jsonl and parquet need a "
         f"'text' field) or hf:DATASET[:CONFIG[:SPLIT[:FIELD]]]")

# (dataset, config, split, field, separator): the load_dataset calls of the reference scripts.
_HUB_SETS = {
    WIKITEXT2: ("wikitext", "wikitext-2-raw-v1", "test", "text", "\n\n"),
    # GPTQ's get_ptb_new (test split, " "-joined), the protocol of the later papers; its older
    # get_ptb used the validation split joined with "\n\n".
    PTB: ("ptb_text_only", "penn_treebank", "test", "sentence", " "),
}
C4_REPO = "allenai/c4"
C4_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_WINDOWS = 256
_LABELS = {
    SHAKESPEARE: "Shakespeare held-out plays",
    WIKITEXT2: "WikiText-2 (raw, test)",
    C4: f"C4 (validation shard 0, {C4_WINDOWS} random windows)",
    PTB: "PTB (test)",
}
_METRICS = {SHAKESPEARE: "ppl", WIKITEXT2: "ppl_wikitext2", C4: "ppl_c4", PTB: "ppl_ptb"}

# A dataset cached under other configurations raises a ValueError rather than one of
# MISSING_DATA_ERRORS, matched by its message in :func:`_load_hf`.
_MISSING_CONFIG = "Couldn't find cache for"
_MANY_CONFIGS = "There are multiple"
_UNKNOWN_SPLIT = "Unknown split"

_FILE_ENTRY = re.compile(r"^file:(?P<path>.+)@(?P<digest>[0-9a-f]{16})$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_NAME_PART = re.compile(r"^[A-Za-z0-9_.-]+$")

# Token streams per (tokenizer definition, entry, seq_len or None where the stream does not
# depend on it): a grid evaluates many runs of one model in one process.
_IDS: dict[tuple[str, str, int | None], torch.Tensor] = {}
_MAX_MEMO = 8


# --- parsing ---------------------------------------------------------------------------------

def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _hf_parts(entry: str) -> tuple[str, str | None, str, str]:
    """(dataset, config or None, split, field) of an ``hf:`` entry.

    Raises:
        HarnessError: a malformed entry.
    """
    parts = entry[len("hf:"):].split(":")
    usage = ("use hf:DATASET[:CONFIG[:SPLIT[:FIELD]]], e.g. "
             "hf:wikitext:wikitext-103-raw-v1:test:text")
    if len(parts) > 4:
        raise HarnessError(f"ppl data {entry!r}: more than 4 ':'-separated parts; {usage}")
    dataset, config, split, field = (*parts, "", "", "")[:4]
    if not _REPO_ID.match(dataset):
        raise HarnessError(f"ppl data {entry!r}: {dataset!r} is not a Hugging Face dataset id "
                           f"(NAME or OWNER/NAME); {usage}")
    for what, value in (("config", config), ("split", split), ("field", field)):
        if value and not _NAME_PART.match(value):
            raise HarnessError(f"ppl data {entry!r}: bad {what} {value!r} (letters, digits, "
                               f"'_', '-', '.' only); {usage}")
    return dataset, config or None, split or "test", field or "text"


def _canonical(item: str) -> str:
    lowered = item.lower()
    if lowered in NAMES:
        return lowered
    if item.startswith("hf:"):
        dataset, config, split, field = _hf_parts(item)
        return f"hf:{dataset}:{config or ''}:{split}:{field}"
    match = _FILE_ENTRY.match(item)
    if match:
        # Already canonical: kept as is, the file may live on another machine (a stored run).
        _check_suffix(item, Path(match["path"]))
        return item
    path = Path(item.removeprefix("file:")).expanduser()
    if path.is_file():
        _check_suffix(item, path)
        return f"file:{path.resolve()}@{_digest(path)}"
    if path.exists():
        raise HarnessError(f"ppl data {item!r} is a folder; pass a file ({' / '.join(FILE_SUFFIXES)})")
    if item.startswith("file:") or "/" in item or path.suffix.lower() in FILE_SUFFIXES:
        raise HarnessError(f"ppl data file {item!r} does not exist; pass a readable file or one "
                           f"of: {FORMS}")
    close = difflib.get_close_matches(lowered, NAMES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise HarnessError(f"unknown ppl data {item!r}{hint}, and no such file; use {FORMS}")


def _check_suffix(item: str, path: Path) -> None:
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise HarnessError(f"ppl data file {item!r}: unsupported suffix {path.suffix or '(none)'!r}; "
                           f"use .txt (plain text), .jsonl (one {{\"text\": ...}} object a line) "
                           f"or .parquet (a 'text' column)")


def _items(value: str | Sequence[str]) -> list[str]:
    if isinstance(value, str):
        return [p.strip() for p in value.split(",")]
    items: list[str] = []
    for item in value:
        item = str(item).strip()
        # A list element may itself be comma-separated (argparse "append"), unless it is a
        # canonical file entry or an existing file whose name holds a comma.
        if "," in item and not item.startswith("file:") and not Path(item).expanduser().is_file():
            items.extend(p.strip() for p in item.split(","))
        else:
            items.append(item)
    return items


def parse_ppl_data(value: str | Sequence[str]) -> tuple[str, ...]:
    """Canonical entries of ``value`` (comma-separated string or list), duplicates removed,
    order kept. A FILE becomes ``file:<absolute path>@<sha256[:16] of its bytes>``; an ``hf:``
    entry gets its defaults written out (``hf:DATASET:CONFIG:SPLIT:FIELD``, CONFIG may be empty).

    Raises:
        HarnessError: empty value, unknown name that is no file, unsupported file suffix,
            malformed ``hf:`` entry, or two entries that would report under one metric name.
    """
    items = [i for i in _items(value if value is not None else "") if i]
    if not items:
        raise HarnessError(f"no ppl data given; use some of: {FORMS}")
    entries = list(dict.fromkeys(_canonical(i) for i in items))
    seen: dict[str, str] = {}
    for entry in entries:
        name = metric_name(entry)
        if name in seen:
            raise HarnessError(f"ppl data {label(seen[name])!r} and {label(entry)!r} would both "
                               f"report as {name}; keep one, or rename the file / name the config")
        # A user text under a standard set's metric would be compared with the papers' numbers.
        if name in _METRICS.values() and entry not in _METRICS:
            raise HarnessError(f"ppl data {label(entry)!r} would report as {name}, the metric of "
                               f"the standard {entry_for_metric(name)} evaluation; rename the "
                               f"file (or name the hf: config)")
        seen[name] = entry
    return tuple(entries)


def entry_for_metric(name: str) -> str | None:
    """The standard entry that reports as metric ``name`` (None for user files and hf:)."""
    return next((e for e, m in _METRICS.items() if m == name), None)


def _file_parts(entry: str) -> tuple[Path, str]:
    match = _FILE_ENTRY.match(entry)
    if not match:
        raise HarnessError(f"ppl data {entry!r} is not a canonical file entry; pass it through "
                           f"parse_ppl_data first")
    return Path(match["path"]), match["digest"]


def _sanitize(text: str) -> str:
    return re.sub(r"[^a-z0-9_]", "_", text.lower())


def metric_name(entry: str) -> str:
    """The metric a run records for ``entry``: ``ppl`` (shakespeare, the historical name),
    ``ppl_wikitext2`` / ``ppl_c4`` / ``ppl_ptb``, ``ppl_<file stem>``, or
    ``ppl_<dataset name>[_<config>]`` for ``hf:``."""
    if entry in _METRICS:
        return _METRICS[entry]
    if entry.startswith("file:"):
        return "ppl_" + _sanitize(_file_parts(entry)[0].stem)
    if entry.startswith("hf:"):
        dataset, config, _, _ = _hf_parts(entry)
        base = dataset.split("/")[-1] + (f"_{config}" if config else "")
        return "ppl_" + _sanitize(base)
    raise HarnessError(f"ppl data {entry!r} is not canonical; pass it through parse_ppl_data first")


def label(entry: str) -> str:
    """A short human description of ``entry`` for the CLI and the table notes."""
    if entry in _LABELS:
        return _LABELS[entry]
    if entry.startswith("file:"):
        return _file_parts(entry)[0].name
    return entry


# --- reading ---------------------------------------------------------------------------------

def read_text_file(path: str | Path) -> str:
    """The evaluation text of a file, as ``harness eval --text`` and ``--ppl-data FILE`` use it:
    ``.jsonl`` (a ``text`` field per line) and ``.parquet`` (a ``text`` column) are their values
    joined with blank lines; any other file is read as UTF-8 text (bad bytes replaced).

    Raises:
        HarnessError: unreadable file, malformed JSON line, missing or non-text ``text`` field.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return "\n\n".join(_jsonl_texts(path))
        if suffix == ".parquet":
            return "\n\n".join(_parquet_texts(path))
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise HarnessError(f"cannot read {path}: {exc.strerror or exc}; pass a readable file") from None


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HarnessError(f"{path} line {n} is not JSON ({exc.msg}); write one "
                                   f"{{\"text\": ...}} object a line") from None
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise HarnessError(f"{path} line {n} has no string 'text' field; write one "
                                   f"{{\"text\": ...}} object a line")
            texts.append(text)
    return texts


def _parquet_texts(path: Path) -> list[str]:
    try:  # optional: only .parquet files need pyarrow
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise HarnessError(f"reading {path.name} needs pyarrow; pip install pyarrow, or pass "
                           f"the text as .txt / .jsonl") from None
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError variants for non-parquet
        raise HarnessError(f"{path} is not a readable parquet file ({type(exc).__name__}); "
                           f"write it with a 'text' column") from None
    if "text" not in schema.names:
        raise HarnessError(f"{path} has no 'text' column (columns: {', '.join(schema.names)}); "
                           f"rename the text column to 'text'")
    values = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise HarnessError(f"{path} row {bad}: 'text' is {type(values[bad]).__name__}, not a "
                           f"string; fill or drop that row")
    return values


def _check_file(entry: str) -> Path:
    path, digest = _file_parts(entry)
    if not path.is_file():
        raise HarnessError(f"ppl data file {path} does not exist on this machine; copy it here "
                           f"(same content) or evaluate another file")
    if _digest(path) != digest:
        raise HarnessError(f"ppl data file {path} changed since it was chosen (sha256 prefix "
                           f"{digest} expected); restore it, or pass the file again for a new "
                           f"evaluation")
    return path


# --- Hugging Face data -----------------------------------------------------------------------

def _datasets(entry: str):
    offline_env()
    try:  # optional, and it must come after offline_env(), which it reads when imported
        import datasets
        import datasets.naming
    except ModuleNotFoundError:
        raise HarnessError(f"ppl data {entry!r} needs the package 'datasets'; pip install "
                           f"datasets, or evaluate on shakespeare / a file") from None
    # Every offline load warns that it fell back to the cache, which is the normal case here.
    logging.getLogger("datasets").setLevel(logging.ERROR)
    return datasets


def _fill_command(dataset: str, config: str | None, split: str) -> str:
    return (f"HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0 python -c \"import datasets; "
            f"datasets.load_dataset({dataset!r}, {config!r}, split={split!r})\"")


def _missing(entry: str, exc: BaseException, command: str) -> HarnessError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    name = entry if label(entry) == entry else f"{entry} ({label(entry)})"
    return HarnessError(f"ppl data {name} is not in the local Hugging Face "
                        f"cache ({first}); fill the cache once with network: {command} (or point "
                        f"HF_DATASETS_CACHE / HF_HOME at a cache that holds it)")


def _hub_spec(entry: str) -> tuple[str, str | None, str, str, str]:
    if entry in _HUB_SETS:
        return _HUB_SETS[entry]
    dataset, config, split, field = _hf_parts(entry)
    return dataset, config, split, field, "\n\n"


def _load_hf(entry: str):
    """The split of ``entry`` from the local cache, with its text field checked."""
    datasets = _datasets(entry)
    dataset, config, split, field, _ = _hub_spec(entry)
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except MISSING_DATA_ERRORS as exc:
        raise _missing(entry, exc, _fill_command(dataset, config, split)) from None
    except ValueError as exc:
        message = str(exc)
        if message.startswith(_MISSING_CONFIG):
            raise _missing(entry, exc, _fill_command(dataset, config, split)) from None
        if message.startswith(_MANY_CONFIGS):
            cached = message.splitlines()[0].partition(": ")[2].split(", ")
            raise _many_configs(entry, dataset, cached) from None
        if message.startswith(_UNKNOWN_SPLIT):
            raise HarnessError(f"ppl data {entry}: {message.splitlines()[0]}; name another "
                               f"split (hf:{dataset}:{config or ''}:SPLIT)") from None
        raise
    if config is None:
        _check_one_config(entry, datasets, dataset)
    if field not in ds.column_names:
        raise HarnessError(f"ppl data {entry}: no field {field!r} (fields: "
                           f"{', '.join(ds.column_names)}); name the text field "
                           f"(hf:{dataset}:{config or ''}:{split}:FIELD)")
    dtype = getattr(ds.features[field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise HarnessError(f"ppl data {entry}: field {field!r} holds {ds.features[field]}, not "
                           f"text; name a string field (hf:{dataset}:{config or ''}:{split}:FIELD)")
    return ds


def _check_one_config(entry: str, datasets, dataset: str) -> None:
    """Offline, ``load_dataset(NAME)`` without a config silently takes the most recently
    prepared cached config when several were prepared at different commits (it only refuses
    when they share one), so the entry would name whichever the cache saw last."""
    namespace, _, name = dataset.rpartition("/")
    folder = datasets.naming.camelcase_to_snakecase(name)
    root = Path(datasets.config.HF_DATASETS_CACHE) / (f"{namespace}___{folder}" if namespace else folder)
    configs = sorted({p.parts[-3] for p in root.glob("*/*/*") if p.is_dir()})
    if len(configs) > 1:
        raise _many_configs(entry, dataset, configs)


def _many_configs(entry: str, dataset: str, configs: list[str]) -> HarnessError:
    return HarnessError(f"ppl data {entry}: the cache holds several configurations of {dataset} "
                        f"({', '.join(configs)}); name one, e.g. hf:{dataset}:{configs[0]}")


def _c4_shard() -> Path:
    """The raw C4 validation shard 0 from the local Hugging Face hub cache.

    Not through ``datasets.load_dataset('allenai/c4', data_files=...)``: in datasets 5.2 that
    call cannot reload its own cache offline (the cache folder is named after a hash of the
    data files resolved online, at the repository's commit, and offline it hashes the
    unresolved pattern instead: huggingface/datasets#7551), but the online call downloads the
    shard with ``huggingface_hub``, so the hub cache holds the very file the reference reads.
    """
    datasets = _datasets(C4)
    command = (f"HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0 python -c \"import datasets; "
               f"datasets.load_dataset({C4_REPO!r}, data_files={{'validation': {C4_FILE!r}}}, "
               f"split='validation')\"")
    # after _datasets(): huggingface_hub reads HF_HUB_OFFLINE when first imported
    import huggingface_hub
    from huggingface_hub import constants

    try:
        return Path(huggingface_hub.hf_hub_download(
            C4_REPO, C4_FILE, repo_type="dataset",
            local_files_only=bool(datasets.config.HF_HUB_OFFLINE)))
    except MISSING_DATA_ERRORS as exc:
        # refs/main may have moved on (a later download of the card) while the shard stays in
        # the snapshot it came with; the file has one content in every commit.
        folder = Path(constants.HF_HUB_CACHE) / ("datasets--" + C4_REPO.replace("/", "--"))
        found = sorted(folder.glob(f"snapshots/*/{C4_FILE}"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
        raise _missing(C4, exc, command) from None


def _c4_texts() -> list[str]:
    # The shard is JSON lines in file order, the row order the reference's json builder keeps.
    with gzip.open(_c4_shard(), "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _c4_windows(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """GPTQ's / OmniQuant's ``get_c4`` validation stream: 256 windows of ``seq_len`` tokens,
    each from a random document of at least ``seq_len`` tokens, with ``random.seed(0)``.

    Differences from the reference, none of which changes a stream the reference produces:
    a private ``random.Random(0)`` instead of the global generator; a document of exactly
    ``seq_len`` tokens is drawn again (the reference then calls ``randint(0, -1)`` and
    crashes); the tokenizer is the model's as loaded (the reference loads it with
    ``use_fast=False``); a shard without a long enough document is an error, not an endless
    loop. Like the reference, the window never starts at the last possible offset.
    """
    rng = random.Random(0)
    tokenized: dict[int, list[int]] = {}  # a redrawn document is not tokenized again
    windows = []
    for _ in range(C4_WINDOWS):
        while True:
            i = rng.randint(0, len(texts) - 1)
            if i not in tokenized:
                tokenized[i] = tokenizer(texts[i])["input_ids"]
            ids = tokenized[i]
            if len(ids) > seq_len:
                break
            if len(tokenized) == len(texts) and all(len(v) <= seq_len for v in tokenized.values()):
                raise HarnessError(f"no C4 validation document has more than {seq_len} tokens; "
                                   f"lower --seq-len")
        start = rng.randint(0, len(ids) - seq_len - 1)
        windows.append(torch.tensor(ids[start : start + seq_len], dtype=torch.long))
    return torch.hstack(windows)


# --- public loading --------------------------------------------------------------------------

def check_available(entries) -> None:
    """Fails before any run (and any model) when an entry's text cannot be had: a standard set
    or ``hf:`` dataset not in the local cache, a file missing or changed, the corpus missing.

    Raises:
        HarnessError: one line naming the data set and the fix.
    """
    for entry in parse_ppl_data(entries):
        if entry == SHAKESPEARE:
            data.corpus_dir()
        elif entry == C4:
            _c4_shard()
        elif entry.startswith("file:"):
            read_text_file(_check_file(entry))
        else:
            _load_hf(entry)


def _tokenize_with_specials(tokenizer, text: str) -> torch.Tensor:
    # The reference scripts call tokenizer(text) with its default special tokens (a BOS for
    # Llama tokenizers); the harness's own texts are tokenized without.
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def _build(entry: str, tokenizer, seq_len: int) -> torch.Tensor:
    if entry == C4:
        return _c4_windows(tokenizer, _c4_texts(), seq_len)
    if entry.startswith("file:"):
        return data.tokenize(tokenizer, read_text_file(_check_file(entry)))
    ds = _load_hf(entry)
    _, _, _, field, sep = _hub_spec(entry)
    return _tokenize_with_specials(tokenizer, sep.join(ds[field]))


def load_ids(entry: str, tokenizer, seq_len: int) -> torch.Tensor:
    """The 1-D LongTensor token stream of ``entry`` that :func:`harness.eval.ppl.perplexity`
    cuts into windows of ``seq_len``; memoised per tokenizer definition (the c4 stream also
    per ``seq_len``). Callers must not modify the tensor in place.

    Raises:
        HarnessError: as :func:`check_available`, or a non-canonical entry.
    """
    if entry == SHAKESPEARE:
        return data.split_ids(tokenizer, "eval")
    if entry not in NAMES and not entry.startswith(("file:", "hf:")):
        raise HarnessError(f"ppl data {entry!r} is not canonical; pass it through parse_ppl_data")
    if seq_len <= 0:
        raise HarnessError(f"seq_len {seq_len}: must be a positive number of tokens")
    key = data._tokenizer_key(tokenizer)
    if key is None:
        return _build(entry, tokenizer, seq_len)
    memo = (key, entry, seq_len if entry == C4 else None)
    if memo not in _IDS:
        ids = _build(entry, tokenizer, seq_len)
        if len(_IDS) >= _MAX_MEMO:  # a long-lived process that meets many tokenizers
            _IDS.pop(next(iter(_IDS)))
        _IDS[memo] = ids
    return _IDS[memo]
