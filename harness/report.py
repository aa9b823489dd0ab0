"""Results tables: plain text for the terminal, GitHub markdown for the documentation, and the
generated blocks of README.md and docs/RESULTS.md (standard library only)."""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Sequence

from harness.errors import HarnessError
from harness.stats import mean_std


def fmt_num(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf"
        if abs(value) >= 1e5:
            return f"{value:.3g}"
        return f"{value:,.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if n and _numeric(c) else c.ljust(w)
                               for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _numeric(cell: str) -> bool:
    return cell.replace(",", "").replace(".", "").replace("-", "").replace("e+", "").isdigit()


RESULT_HEADERS = ("run", "method", "bits", "group", "seed", "PPL", "PPL 95% CI", "PPL/FP", "acc",
                  "size MB", "bits/weight", "wall s", "status")


def ci_cell(metrics: dict, name: str = "ppl") -> str:
    """``low-high`` of a PPL's 95% bootstrap interval; "-" for runs stored without one."""
    low, high = metrics.get(f"{name}_ci95_low"), metrics.get(f"{name}_ci95_high")
    if low is None or high is None:
        return "-"
    return f"{fmt_num(low)}-{fmt_num(high)}"


def pm_cell(value, err, digits: int = 2, sep: str = "±") -> str:
    """``value±err`` (no spaces: terminal tables are split on whitespace by scripts)."""
    if value is None:
        return "-"
    return fmt_num(value, digits) + (f"{sep}{fmt_num(err, digits)}" if err is not None else "")


def acc_avg_cell(metrics: dict, sep: str = "±") -> str:
    return pm_cell(metrics.get("acc_avg"), metrics.get("acc_avg_stderr"), 3, sep)


def ppl_protocol(model: str, spec: dict | None) -> tuple:
    """What a stored perplexity depends on besides the weights: the model, the window and the
    token cap (the held-out split is fixed). A PPL/FP ratio divides by the fp run of the same
    protocol, never by one of another window or cap (the quick and full profiles' FP PPL
    differ by 4% on SmolLM2)."""
    ev = (spec or {}).get("eval") or {}
    return model, ev.get("seq_len"), ev.get("max_tokens")


def ppl_ratio(entry: dict, fp_ppl: dict[tuple, float]) -> float | None:
    """PPL/FP of a ``Store.run_as_dict`` entry against the FP run of its own protocol; None
    without a PPL or such an FP run."""
    ppl = entry["metrics"].get("ppl")
    ref = fp_ppl.get(ppl_protocol(entry["model"], entry["spec"]))
    return ppl / ref if ppl is not None and ref else None


def result_rows(entries, fp_ppl: dict[tuple, float]) -> list[list[str]]:
    """Rows of the post-run table; ``entries`` are dicts from ``Store.run_as_dict``,
    ``fp_ppl`` maps :func:`ppl_protocol` to the FP perplexity."""
    rows = []
    for e in entries:
        m = e["metrics"]
        rows.append([e["run_key"], e["method"], fmt_num(e["bits"]), fmt_num(e["group_size"]),
                     fmt_num(e["seed"]), fmt_num(m.get("ppl")), ci_cell(m),
                     fmt_num(ppl_ratio(e, fp_ppl)), acc_avg_cell(m),
                     fmt_num(m.get("size_mb")), fmt_num(m.get("bits_per_weight"), 3),
                     fmt_num(e["wall_s"], 0), e["status"]])
    return rows


# --- replicates: runs of one spec that differ only in the seed -------------------------------

def replicate_key(spec: dict | None) -> str | None:
    """The spec without its seed: runs with the same key are replicates of one experiment.
    None for a run stored without a spec, which is never grouped with another."""
    if not spec:
        return None
    return json.dumps({k: v for k, v in spec.items() if k != "seed"}, sort_keys=True,
                      default=str)


def group_replicates(entries) -> list[list[dict]]:
    """Entries grouped by :func:`replicate_key`, groups in the order of their first run."""
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(replicate_key(e.get("spec")) or f"run {e['id']}", []).append(e)
    return list(groups.values())


def replicate_cell(group: list[dict], metric: str, digits: int = 2, sep: str = "±") -> str:
    """``mean±std (n=k)`` of a metric over a group's finished runs (std with ddof 1)."""
    values = [e["metrics"].get(metric) for e in group if e["status"] == "finished"]
    mean, std, n = mean_std(values)
    if n == 0:
        return "-"
    return f"{pm_cell(mean, std, digits, sep)} (n={n})"


REPLICATE_HEADERS = ("method", "bits", "group", "seeds", "PPL mean±std (n)", "acc mean±std (n)",
                     "runs")


def replicate_rows(entries) -> list[list[str]]:
    """One row per group of two or more replicates (single runs have nothing to summarise)."""
    rows = []
    for group in group_replicates(entries):
        if len(group) < 2:
            continue
        e = group[0]
        rows.append([e["method"], fmt_num(e["bits"]), fmt_num(e["group_size"]),
                     ",".join(str(g["seed"]) for g in group), replicate_cell(group, "ppl"),
                     replicate_cell(group, "acc_avg", 3),
                     " ".join(g["run_key"] for g in group)])
    return rows


def replicate_table(entries) -> str:
    """The replicates summary printed under a run table; "" when no spec has two seeds."""
    rows = replicate_rows(entries)
    if not rows:
        return ""
    return "replicates (runs of one spec, seeds differing):\n" + table(REPLICATE_HEADERS, rows)


# --- harness report: the results table of a database ---------------------------------------

#: Where each method stands in the ablation ladder; the report lists rungs in this order.
LADDER = ("fp", "rtn", "clip", "qat", "bitdistiller", "onebit")


def fp_references(entries) -> dict[tuple, float]:
    """:func:`ppl_protocol` -> FP perplexity, from the finished ``fp`` runs among ``entries``
    (dicts from ``Store.run_as_dict``); the first one stored wins, as in ``harness run``'s table."""
    refs: dict[tuple, float] = {}
    for e in sorted(entries, key=lambda e: e["id"]):
        ppl = e["metrics"].get("ppl")
        if e["method"] == "fp" and e["status"] == "finished" and ppl is not None:
            refs.setdefault(ppl_protocol(e["model"], e["spec"]), ppl)
    return refs


def _ladder_key(e: dict) -> tuple:
    """Model, evaluation protocol, bits from wide to narrow (fp first), then the ladder's order
    (fp, rtn, clip, qat, bitdistiller, onebit; other methods after, by name)."""
    model, seq_len, max_tokens = ppl_protocol(e["model"], e["spec"])
    bits = e["bits"] if e["bits"] is not None else math.inf
    rung = LADDER.index(e["method"]) if e["method"] in LADDER else len(LADDER)
    group = e["group_size"] if e["group_size"] is not None else -math.inf
    return (model, seq_len or 0, max_tokens or math.inf, -bits, rung, e["method"],
            e["fmt"] or "", group, e["id"])


def method_label(e: dict) -> str:
    """The method, with the start a trained run of the weight ladder took when it was not its
    own (``init``, stored beside the ``clip`` flag it replaces; OneBit's ``init`` is its own
    decomposition, not a start, and has no such flag)."""
    config = (e.get("spec") or {}).get("config") or {}
    init = config.get("init") if "clip" in config else None
    return f"{e['method']} (init={init})" if init else e["method"]


def _train_steps(spec: dict) -> int | None:
    train = ((spec or {}).get("config") or {}).get("train")
    return train.get("steps") if isinstance(train, dict) else None


def _report_tasks(entries) -> list[str]:
    """Tasks with an ``acc`` among the runs: in the order the runs' specs name them."""
    named = [t for e in entries for t in ((e["spec"] or {}).get("eval") or {}).get("tasks") or ()]
    have = {k[:-len("/acc")] for e in entries for k in e["metrics"] if k.endswith("/acc")}
    return [t for t in dict.fromkeys(named) if t in have] + sorted(have - set(named))


def _acc_cell(metrics: dict, task: str) -> str:
    acc, err = metrics.get(f"{task}/acc"), metrics.get(f"{task}/acc_stderr")
    if acc is None:
        return "-"
    return fmt_num(acc, 3) + (f" ± {fmt_num(err, 3)}" if err is not None else "")


def _protocol_note(spec: dict) -> str:
    ev = (spec or {}).get("eval") or {}
    cap = ev.get("max_tokens")
    scope = f"first {cap:,} held-out tokens" if cap else "all held-out tokens"
    note = f"PPL: {scope}, windows of {ev.get('seq_len')}"
    if ev.get("tasks"):
        limit = ev.get("limit")
        note += (f"; accuracy: first {limit} examples per task" if limit
                 else "; accuracy: every example of each task")
    return note + f" (profile {(spec or {}).get('profile')})."


def report_table(entries, methods: list[str] | None = None
                 ) -> tuple[list[str], list[list[str]], list[str]]:
    """The results table of ``harness report``: ``(headers, rows, notes)``.

    ``entries`` are dicts from ``Store.run_as_dict``; only finished runs appear (of
    ``methods`` when given), in :func:`_ladder_key` order. PPL/FP divides by the FP run of the
    same :func:`ppl_protocol` ("-" without one, even when ``methods`` leaves fp out). Task
    columns show each task's ``acc`` (the metric ``acc_avg`` averages) ± lm-eval's standard
    error where stored. A model column appears when there are several models, a tokens/window
    column when there are several protocols; ``notes`` says each protocol's evaluation."""
    finished = [e for e in entries if e["status"] == "finished"]
    refs = fp_references(finished)
    shown = sorted((e for e in finished if not methods or e["method"] in methods),
                   key=_ladder_key)
    tasks = _report_tasks(shown)
    several_models = len({e["model"] for e in shown}) > 1
    several_protocols = len({ppl_protocol(e["model"], e["spec"])[1:] for e in shown}) > 1
    headers = (["model"] if several_models else []) + (
        ["tokens/window"] if several_protocols else []) + [
        "method", "fmt", "bits", "group", "PPL", "PPL 95% CI", "PPL/FP",
        *(f"{t} acc" for t in tasks), "acc_avg", "bits/weight", "size MB", "train steps"]
    rows, notes = [], []
    for group in group_replicates(shown):
        e = group[0]
        m = e["metrics"]
        _, seq_len, cap = ppl_protocol(e["model"], e["spec"])
        row = ([e["model"]] if several_models else []) + (
            [f"{'all' if cap is None else f'{cap:,}'}/{seq_len}"]
            if several_protocols else [])
        if len(group) == 1:
            cells = [fmt_num(m.get("ppl")), ci_cell(m), fmt_num(ppl_ratio(e, refs)),
                     *(_acc_cell(m, t) for t in tasks), acc_avg_cell(m, " ± ")]
        else:
            ratios = [ppl_ratio(g, refs) for g in group]
            ratio = (sum(ratios) / len(ratios)) if None not in ratios else None
            cells = [replicate_cell(group, "ppl", sep=" ± "), "-", fmt_num(ratio),
                     *(replicate_cell(group, f"{t}/acc", 3, " ± ") for t in tasks),
                     replicate_cell(group, "acc_avg", 3, " ± ")]
        row += [method_label(e), e["fmt"] or "-", fmt_num(e["bits"]),
                fmt_num(e["group_size"]), *cells, fmt_num(m.get("bits_per_weight"), 3),
                fmt_num(m.get("size_mb")), fmt_num(_train_steps(e["spec"]))]
        rows.append(row)
        note = _protocol_note(e["spec"])
        if several_models:
            note = f"{e['model']}: {note}"
        if note not in notes:
            notes.append(note)
    return headers, rows, notes


_TEXT_COLUMNS = {"model", "tokens/window", "method", "fmt"}


def markdown_table(headers, rows) -> str:
    """A GitHub markdown table; number columns right-aligned."""
    def cell(value) -> str:
        return str(value).replace("|", "\\|")

    align = ["---" if h in _TEXT_COLUMNS else "---:" for h in headers]
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_report(entries, markdown: bool = False, methods: list[str] | None = None) -> str:
    """``harness report``'s output: the table (markdown or plain text), then its notes."""
    headers, rows, notes = report_table(entries, methods)
    body = markdown_table(headers, rows) if markdown else table(headers, rows)
    lines = [body, ""] if markdown else [body]
    lines += ["PPL/FP divides by the fp run of the same model, window and token cap. PPL 95% CI: "
              "bootstrap over the evaluation windows (\"-\": stored without per-window "
              "results); accuracy ± lm-eval's standard error; replicates of one spec (seeds) "
              "show mean ± std (n).", *notes]
    return "\n".join(lines)


# --- report blocks: generated tables inside the documentation -------------------------------

REPORT_BLOCK = re.compile(r"^<!-- report: (?P<command>.+?) -->\n(?P<body>.*?)^<!-- /report -->$",
                          re.M | re.S)


def report_blocks(text: str) -> list[tuple[list[str], str]]:
    """``(argv, body)`` of each generated block in a markdown file: the lines between
    ``<!-- report: harness report ... -->`` and ``<!-- /report -->``, and the command's
    arguments after ``harness``. Only ``harness report`` may fill a block.

    Raises:
        HarnessError: a block whose command is not ``harness report ...``.
    """
    blocks = []
    for match in REPORT_BLOCK.finditer(text):
        argv = shlex.split(match["command"])
        if argv[:2] != ["harness", "report"]:
            raise HarnessError(f"report block {match['command']!r}: only `harness report ...` "
                               f"generates a block")
        blocks.append((argv[1:], match["body"]))
    return blocks


def replace_report_blocks(text: str, outputs: list[str]) -> str:
    """``text`` with each block's body replaced by the matching entry of ``outputs`` (the
    commands' stdout, in :func:`report_blocks` order)."""
    it = iter(outputs)

    def fill(match: re.Match) -> str:
        body = next(it).rstrip("\n")
        body = body + "\n" if body else ""
        return f"<!-- report: {match['command']} -->\n{body}<!-- /report -->"

    out = REPORT_BLOCK.sub(fill, text)
    if next(it, None) is not None:
        raise ValueError("more outputs than report blocks")
    return out
