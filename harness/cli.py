"""``harness`` command line: thin parsing, one function per command.

Bad input ends with ``error: <one line>`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from harness.errors import HarnessError
from harness.interrupts import explain, installed
from harness.store import DEFAULT_DB

log = logging.getLogger("harness")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _ints(value: str) -> list[int]:
    try:
        return [int(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {value!r}") from None


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value!r}")
    return n


class _Parser(argparse.ArgumentParser):
    """One ``error:`` line and exit 2 for bad arguments, like every other bad input (argparse
    prints its whole usage block)."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def _add_db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=os.environ.get("HARNESS_DB", DEFAULT_DB),
                   help=f"SQLAlchemy URL of the results database (default {DEFAULT_DB})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="harness", description="Quantize causal LMs to 3/2/1 bits and compare methods.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="quantize, evaluate and store runs")
    p.add_argument("experiment", nargs="?", help="experiment YAML file (grid of runs)")
    p.add_argument("--methods", type=_csv, help="comma list, e.g. rtn,bitdistiller,onebit; "
                   "with an experiment file, only these of its methods run")
    p.add_argument("--model", default=None, help="smollm2-135m (default), tiny-llama, HF id or path")
    p.add_argument("--bits", type=_ints, help="weight bits, comma list allowed (e.g. 3,2)")
    p.add_argument("--group-size", type=int, default=None,
                   help="quantization group along inputs; -1 = per row; default 128 if it "
                        "divides every layer, else 64/32")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="method config override (JSON value), e.g. --set loss=rkl --set train.steps=10")
    p.add_argument("--profile", choices=["quick", "full"], default=None,
                   help="quick (CPU default) or full (GPU default)")
    p.add_argument("--seed", type=int, default=None,
                   help="run seed (default 0, or the experiment file's seeds)")
    p.add_argument("--seeds", type=_ints, default=None,
                   help="replicates: one run per seed (e.g. 0,1,2); tables show mean ± std (n)")
    p.add_argument("--tasks", default=None, help="lm-eval tasks after perplexity (comma list)")
    p.add_argument("--limit", type=int, default=None, help="examples per task")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="few-shot examples for the lm-eval tasks (the papers' MMLU: 5)")
    p.add_argument("--allow-code-eval", action="store_true",
                   help="let humaneval execute model-generated code on this machine")
    p.add_argument("--ppl-data", default=None,
                   help="perplexity data, comma list: shakespeare (default), wikitext2, c4, ptb, "
                        "a .txt/.jsonl/.parquet FILE, hf:DATASET[:CONFIG[:SPLIT[:FIELD]]]; "
                        "datasets come from the local Hugging Face cache")
    p.add_argument("--max-eval-tokens", type=int, default=None,
                   help="cap held-out tokens for perplexity")
    p.add_argument("--seq-len", type=int, default=None, help="perplexity window (default 2048)")
    p.add_argument("--output-dir", default="runs", help="run folders (checkpoints, packed models)")
    p.add_argument("--scheduler", choices=["inline", "ray"], default=None,
                   help="ray (default for experiment files) or inline (in-process)")
    p.add_argument("--ray-address", default=None, help="join an existing Ray cluster")
    p.add_argument("--gpus-per-run", type=float, default=None,
                   help="GPUs per Ray task (fractions share one; 2 or more: one run's training "
                        "on that many GPUs, FSDP2)")
    p.add_argument("--workers-per-run", type=int, default=None, metavar="N",
                   help="train each run on N Ray Train workers (FSDP2; CPUs: gloo, GPUs: NCCL); "
                        "the batch is the global batch, the run key does not change")
    p.add_argument("--cpus-per-run", type=float, default=None,
                   help="CPUs Ray reserves per run (default 1; fractions run more at once)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--force", action="store_true", help="rerun finished runs too")
    p.add_argument("--no-fp", action="store_true", help="skip the unquantized reference run (fp)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--dry-run", action="store_true",
                   help="print each planned run's estimated peak memory per device and whether "
                        "it fits, from the model's config only; loads, runs and stores nothing")
    p.add_argument("--device-mem", type=float, default=None, metavar="GB",
                   help="memory of one device in GiB (default: the GPU's total, else this "
                        "machine's RAM): --dry-run plans against it, and a run takes each "
                        "micro-batch share that does not fit it in pieces (train.micro_batch)")
    _add_db(p)

    p = sub.add_parser("methods", help="list registered methods and their config fields")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("list", help="list stored runs")
    p.add_argument("--json", action="store_true")
    p.add_argument("--status", choices=["running", "finished", "failed", "pending"])
    _add_db(p)

    p = sub.add_parser("report", help="results table of the finished runs (ladder order, "
                       "PPL/FP, accuracy per task)")
    p.add_argument("--markdown", action="store_true", help="a GitHub markdown table")
    p.add_argument("--methods", type=_csv, help="only these methods (comma list); PPL/FP still "
                   "divides by the database's fp runs")
    _add_db(p)

    p = sub.add_parser("compare", help="two runs evaluated on the same data, paired: PPL ratio "
                       "with its 95%% interval, accuracy by McNemar's test, significance")
    p.add_argument("run_a", help="run id or run key (prefix)")
    p.add_argument("run_b", help="run id or run key (prefix); the ratio is A / B")
    p.add_argument("--json", action="store_true")
    _add_db(p)

    p = sub.add_parser("show", help="one run: spec, metrics, memory, error")
    p.add_argument("run", help="run id or run key (prefix)")
    p.add_argument("--json", action="store_true")
    _add_db(p)

    p = sub.add_parser("export", help="write a stored run's model: HF checkpoint and packed file")
    p.add_argument("run")
    p.add_argument("dir")
    p.add_argument("--packed", action="store_true", help="only the packed safetensors file")
    _add_db(p)

    p = sub.add_parser("eval", help="perplexity (and tasks) of a stored run or an exported "
                       "model on any text")
    p.add_argument("run", help="a run key (prefix) or id, or a path written by `harness export` "
                   "(folder or packed.safetensors)")
    p.add_argument("--text", help="text file to compute perplexity on (default: held-out plays)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="perplexity window (default: the run's own, else 2048)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="cap on scored tokens (default: the run's own cap on the held-out "
                   "text, which reproduces its stored PPL; all of a --text file)")
    p.add_argument("--tasks", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="few-shot examples for the tasks (the papers' MMLU: 5)")
    p.add_argument("--allow-code-eval", action="store_true",
                   help="let humaneval execute model-generated code on this machine")
    p.add_argument("--device", default=None)
    _add_db(p)

    p = sub.add_parser("gen-data", help="generate (and cache) teacher continuations")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=_positive, default=None,
                   help="continuations to generate (default: the profile's)")
    p.add_argument("--new-tokens", type=_positive, default=None,
                   help="tokens per continuation (default: the profile's)")
    p.add_argument("--profile", choices=["quick", "full"], default=None,
                   help="quick (CPU default) or full (GPU default)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")

    p = sub.add_parser("dashboard", help="Streamlit dashboard on 127.0.0.1 (read-only)")
    p.add_argument("--port", type=int, default=8501)
    _add_db(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from sqlalchemy.exc import SQLAlchemyError

    from harness import commands

    with installed():  # SIGTERM stops like Ctrl-C; training checkpoints first
        try:
            return getattr(commands, "cmd_" + args.command.replace("-", "_"))(args) or 0
        except BrokenPipeError:
            # the reader left (`harness list | head`): stop quietly, as the Python docs advise,
            # pointing stdout at devnull so the interpreter's final flush does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        except HarnessError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        except SQLAlchemyError as exc:  # the database failed mid-command (locked, disk full...)
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            print(f"error: the results database failed ({type(exc).__name__}: {reason}); "
                  f"pass a lowbit-harness database (--db) that no other process holds locked",
                  file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            stop = explain(exc)
            print(f"error: {stop}", file=sys.stderr)
            return stop.exit_code


def entry() -> int:
    """The ``harness`` console command: :func:`main` in a process whose freed host memory stays
    with it (``harness.host_memory``; tests call :func:`main` and keep their allocator)."""
    from harness.host_memory import keep_freed_memory

    keep_freed_memory()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
