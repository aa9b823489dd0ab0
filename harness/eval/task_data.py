"""Offline lm-eval tasks built from the held-out plays (Hamlet, Macbeth, Tempest, Twelfth Night).

Two tasks, both cheap (no generation) and both built only from ``data.EVAL_PLAYS``:

- ``shakespeare_cloze``: LAMBADA-style last-word prediction. The context is a few preceding
  lines plus the current verse line without its last word; the target is ``" " + word``. Scored
  like lm-eval's ``lambada_openai``: ``output_type: loglikelihood``, ``acc`` = the target is the
  model's greedy continuation. As in LAMBADA, only lines whose last word already occurs in the
  context are kept (the word is recoverable from the passage, not a guess among rhymes).
- ``shakespeare_nextline``: multiple choice; the context is a few lines of a speech, the choices
  are the true next line and three other lines of the same play (seeded). Chance = 25%.

The JSONL files and the task YAMLs (templates in ``harness/eval/tasks/``, with the data path
filled in) are written to ``<cache>/tasks/v<VERSION>/`` once; a later call finds them there.
Everything is deterministic: same corpus + same version = byte-identical files.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from harness import data
from harness.paths import cache_dir, replaced

# Bump when the selection rules or the templates change: a new folder is built beside the old.
TASK_DATA_VERSION = 1
SEED = 1234
# Cap per task (after a seeded shuffle): ~1% standard error, and a bounded full-profile cost.
MAX_DOCS = 2000
CLOZE_CONTEXT_LINES = 6
NEXTLINE_CONTEXT_LINES = 3
TEMPLATES = Path(__file__).parent / "tasks"
DATA_DIR_TOKEN = "__DATA_DIR__"

_SPEAKER = re.compile(r"^[A-Z][A-Z0-9' ,&-]*\.$")  # "FIRST WITCH.", "LADY MACBETH."
# Hamlet's tags are abbreviated and mixed case ("Ham.", "1 Clown."): a short capitalised line
# ending in "." right after a blank line opens a speech.
_SHORT_TAG = re.compile(r"^(?:[A-Z0-9][\w']*\.? ?){1,3}$")
_HEADER = re.compile(r"^(ACT|SCENE|EPILOGUE|PROLOGUE)\b")
_TRAILING = ".,;:!?'\"-)]"


@dataclass(frozen=True)
class OfflineTask:
    name: str
    description: str
    chance: float


OFFLINE_TASKS: dict[str, OfflineTask] = {
    "shakespeare_cloze": OfflineTask(
        "shakespeare_cloze",
        "last word of a held-out verse line given the passage (greedy exact match)", 0.0),
    "shakespeare_nextline": OfflineTask(
        "shakespeare_nextline",
        "true next line among 4 lines of the same held-out play", 0.25),
}


def is_dialogue(line: str, previous: str = "") -> bool:
    """A spoken line: not blank, not a speaker tag, stage direction or act/scene header.

    Args:
        line: the line to classify.
        previous: the line before it (a speaker tag follows a blank line).
    """
    s = line.strip()
    if not s or s.startswith("[") or _SPEAKER.match(s) or _HEADER.match(s):
        return False
    return not (not previous.strip() and s.endswith(".") and _SHORT_TAG.match(s))


def _spoken(lines: list[str]) -> list[bool]:
    return [is_dialogue(ln, lines[i - 1] if i else "") for i, ln in enumerate(lines)]


def _body_lines(play: str) -> list[str]:
    """The play's lines from its first ``ACT`` header on (drops the cast list)."""
    lines = data.read_play(play).split("\n")
    start = next((i for i, ln in enumerate(lines) if ln.strip().startswith("ACT ")), 0)
    return [ln.rstrip() for ln in lines[start:]]


def _context(lines: list[str], i: int, n_nonblank: int) -> str | None:
    """The raw text of the ``n_nonblank`` non-blank lines before ``i`` (blank lines kept)."""
    j, seen = i, 0
    while j > 0 and seen < n_nonblank:
        j -= 1
        if lines[j].strip():
            seen += 1
    if seen < n_nonblank:
        return None
    return "\n".join(lines[j:i]).strip("\n")


def split_last_word(line: str) -> tuple[str, str] | None:
    """``(line without its last word, word)`` when the last word is alphabetic, >= 3 letters.

    Trailing punctuation after the word is dropped ("fair:" -> "fair"); a line of fewer than
    three words is rejected (too little of the line to condition on).
    """
    words = line.strip().split()
    if len(words) < 3:
        return None
    word = words[-1].rstrip(_TRAILING)
    if len(word) < 3 or not word.isalpha():
        return None
    head = line.rstrip()
    head = head[: head.rstrip(_TRAILING).rfind(word)].rstrip()
    return head, word


def cloze_docs(play: str) -> list[dict]:
    lines = _body_lines(play)
    spoken = _spoken(lines)
    docs = []
    for i, line in enumerate(lines):
        if not spoken[i]:
            continue
        split = split_last_word(line)
        ctx = _context(lines, i, CLOZE_CONTEXT_LINES)
        if split is None or ctx is None:
            continue
        head, word = split
        context = f"{ctx}\n{head}"
        # LAMBADA's property: the word is recoverable from the passage (case-insensitive).
        if not re.search(rf"\b{re.escape(word)}\b", ctx, flags=re.IGNORECASE):
            continue
        docs.append({"play": play, "line": i, "context": context, "target": " " + word})
    return docs


def nextline_docs(play: str, rng: random.Random) -> list[dict]:
    lines = _body_lines(play)
    spoken = _spoken(lines)
    pool = sorted({ln.strip() for ln, ok in zip(lines, spoken, strict=True) if ok and len(ln.split()) >= 4})
    docs = []
    for i, line in enumerate(lines):
        true = line.strip()
        # The next line continues the same speech: the line before it is spoken too.
        if not (spoken[i] and len(true.split()) >= 4 and i > 0 and spoken[i - 1]):
            continue
        ctx = _context(lines, i, NEXTLINE_CONTEXT_LINES)
        if ctx is None:
            continue
        distractors: list[str] = []
        while len(distractors) < 3:
            cand = pool[rng.randrange(len(pool))]
            if cand != true and cand not in distractors and cand not in ctx:
                distractors.append(cand)
        label = rng.randrange(4)
        choices = distractors[:label] + [true] + distractors[label:]
        docs.append({"play": play, "line": i, "context": ctx + "\n", "choices": choices,
                     "label": label})
    return docs


def build_docs(task: str) -> list[dict]:
    """The documents of ``task`` from the held-out plays: seeded shuffle, capped at MAX_DOCS."""
    rng = random.Random(f"{SEED}-{task}")
    docs: list[dict] = []
    for play in data.EVAL_PLAYS:
        docs += cloze_docs(play) if task == "shakespeare_cloze" else nextline_docs(play, rng)
    rng.shuffle(docs)  # so that --limit N takes a mix of all four plays
    return docs[:MAX_DOCS]


def tasks_dir() -> Path:
    """``<cache>/tasks/v<VERSION>``: JSONL data and ready-to-load lm-eval YAMLs, built once.

    This folder is what ``lm_eval.tasks.TaskManager(include_path=...)`` is pointed at.
    """
    out = cache_dir() / "tasks" / f"v{TASK_DATA_VERSION}"
    done = out / ".complete"
    if done.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for name in OFFLINE_TASKS:
        with replaced(out / f"{name}.jsonl") as tmp, tmp.open("w", encoding="utf-8") as f:
            for doc in build_docs(name):
                f.write(json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n")
        template = (TEMPLATES / f"{name}.yaml").read_text(encoding="utf-8")
        with replaced(out / f"{name}.yaml") as tmp:
            tmp.write_text(template.replace(DATA_DIR_TOKEN, str(out)), encoding="utf-8")
    done.touch()
    return out
