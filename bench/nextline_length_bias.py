"""How far shakespeare_nextline's ``acc_norm`` can be reached without a model.

    python bench/nextline_length_bias.py [--limit N]

lm-eval's ``acc_norm`` picks the choice with the highest log-likelihood per byte, which
favours choices that are cheap per character. This scores three model-free rules on the task's
documents (all of them, up to the task's 2,000, or the first ``--limit`` as the quick profile
scores): the choice with the most characters per SmolLM2 token, the longest choice, and the
first choice (chance 25%). A rule well above chance is a bias ``acc_norm`` can pick up,
which is why the harness averages ``acc`` into ``acc_avg``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N documents only")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from harness.eval.task_data import build_docs
    from harness.models import _converted_smollm2

    tok = AutoTokenizer.from_pretrained(_converted_smollm2())
    docs = build_docs("shakespeare_nextline")[:args.limit]

    def chars_per_token(choice: str) -> float:
        return len(choice) / max(1, len(tok(choice, add_special_tokens=False)["input_ids"]))

    rules = {
        "most characters per token": lambda d: max(range(4), key=lambda i: chars_per_token(
            d["choices"][i])),
        "longest choice (characters)": lambda d: max(range(4), key=lambda i: len(d["choices"][i])),
        "first choice": lambda d: 0,
    }
    print(f"shakespeare_nextline: {len(docs)} documents, 4 choices each (chance 0.25)")
    for name, pick in rules.items():
        acc = sum(pick(d) == d["label"] for d in docs) / len(docs)
        print(f"  {name:28s} acc {acc:.3f}")


if __name__ == "__main__":
    main()
