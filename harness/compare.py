"""``harness compare RUN_A RUN_B``: two runs, paired on what both evaluated.

Perplexity pairs per window (both runs must have scored the same windows of the same data),
accuracy pairs per example (same task, same examples). Pairing removes the variation of the
data from the comparison, which is what makes a small gap between two methods testable.
"""

from __future__ import annotations

from typing import Any

from harness.errors import HarnessError
from harness.report import fmt_num, table
from harness.stats import BOOTSTRAP_ITERS, mcnemar, paired_ppl


def _eval_of(run) -> dict:
    return (run.spec or {}).get("eval") or {}


def _ppl_entries(run) -> dict[str, str]:
    """PPL metric name -> the data-set entry it was computed on."""
    # startup of `harness compare`, which needs no torch otherwise: ppl_data imports it
    from harness.eval.ppl_data import DEFAULT, metric_name

    return {metric_name(e): e for e in (_eval_of(run).get("ppl_data") or DEFAULT)}


def _same_windows(run_a, run_b, metric: str) -> str | None:
    """Why the two runs' windows of ``metric`` differ, or None when they are the same."""
    ea, eb = _eval_of(run_a), _eval_of(run_b)
    if run_a.model != run_b.model:
        return f"different models ({run_a.model} vs {run_b.model}), so different tokens"
    for key in ("seq_len", "max_tokens"):
        if ea.get(key) != eb.get(key):
            return f"different {key} ({ea.get(key)} vs {eb.get(key)})"
    if _ppl_entries(run_a).get(metric) != _ppl_entries(run_b).get(metric):
        return "different data behind the same metric name"
    return None


def _same_examples(run_a, run_b) -> str | None:
    ea, eb = _eval_of(run_a), _eval_of(run_b)
    for key in ("limit", "num_fewshot"):
        if ea.get(key) != eb.get(key):
            return f"different {key} ({ea.get(key)} vs {eb.get(key)})"
    return None


def compare_runs(store, ref_a: str, ref_b: str) -> dict[str, Any]:
    """Paired comparison of two stored runs.

    Returns:
        ``{"a": run dict, "b": run dict, "ppl": [...], "accuracy": [...], "skipped": [...]}``;
        each ``ppl`` row holds the metric, both PPLs, the ratio A/B with its 95% interval, the
        p-value and whether the difference is significant; each ``accuracy`` row the task,
        both accuracies, the discordant counts and McNemar's p-value.

    Raises:
        HarnessError: unknown runs, a run compared with itself, or nothing both runs
            evaluated per window or per example (runs stored before per-window results were
            kept have none: rerun them with --force).
    """
    run_a, run_b = store.get_run(ref_a), store.get_run(ref_b)
    if run_a.id == run_b.id:
        raise HarnessError(f"both arguments name run {run_a.run_key}; pass two different runs")
    sa, sb = store.series(run_a.id), store.series(run_b.id)
    ma, mb = store.metric_dict(run_a.id), store.metric_dict(run_b.id)
    out: dict[str, Any] = {"a": _brief(run_a), "b": _brief(run_b), "ppl": [], "accuracy": [],
                           "skipped": []}
    for (name, task) in sorted(set(sa) & set(sb)):
        if name not in ("nll", "correct"):
            continue
        a, b = sa[name, task], sb[name, task]
        unit = "windows" if name == "nll" else "examples"
        why = (_same_windows(run_a, run_b, task) if name == "nll"
               else _same_examples(run_a, run_b))
        if why is None and len(a) != len(b):
            why = f"{len(a)} vs {len(b)} {unit}"
        if why:
            out["skipped"].append(f"{task}: {why}")
        elif name == "nll":
            res = paired_ppl(a, b)
            out["ppl"].append(dict(metric=task, ppl_a=ma.get(task), ppl_b=mb.get(task),
                                   ratio=res.ratio, ci95_low=res.low, ci95_high=res.high,
                                   p_value=res.p_value, significant=res.significant,
                                   windows=res.windows))
        else:
            res = mcnemar(a, b)
            out["accuracy"].append(dict(task=task, acc_a=res.acc_a, acc_b=res.acc_b,
                                        only_a=res.only_a, only_b=res.only_b, n=res.n,
                                        p_value=res.p_value, significant=res.significant))
    if not out["ppl"] and not out["accuracy"]:
        missing = [r.run_key for r, s in ((run_a, sa), (run_b, sb)) if not s]
        if missing:
            raise HarnessError(f"run {', '.join(missing)} has no per-window results (stored "
                               f"before they were kept); rerun it with --force to compare")
        why = "; ".join(out["skipped"]) or "no data set or task in common"
        raise HarnessError(f"runs {run_a.run_key} and {run_b.run_key} share no evaluation to "
                           f"pair ({why}); evaluate both with the same --ppl-data, --seq-len, "
                           f"--max-eval-tokens, --tasks and --limit")
    return out


def _brief(run) -> dict[str, Any]:
    return {"run_key": run.run_key, "method": run.method, "model": run.model, "fmt": run.fmt,
            "bits": run.bits, "group_size": run.group_size, "seed": run.seed}


def _describe(r: dict) -> str:
    q = f" {r['fmt']} w{r['bits']} g{r['group_size']}" if r["bits"] is not None else ""
    return f"{r['run_key']} {r['method']}{q} seed {r['seed']} ({r['model']})"


def _verdict(significant: bool, a_better: bool) -> str:
    if not significant:
        return "within noise"
    return "A better" if a_better else "B better"


def render_compare(result: dict[str, Any]) -> str:
    lines = [f"A: {_describe(result['a'])}", f"B: {_describe(result['b'])}"]
    if result["ppl"]:
        rows = [[r["metric"], fmt_num(r["ppl_a"]), fmt_num(r["ppl_b"]), fmt_num(r["ratio"], 4),
                 f"{fmt_num(r['ci95_low'], 4)}-{fmt_num(r['ci95_high'], 4)}",
                 fmt_num(r["p_value"], 4), r["windows"], _verdict(r["significant"], r["ratio"] < 1)]
                for r in result["ppl"]]
        lines += ["", f"perplexity, paired bootstrap over windows ({BOOTSTRAP_ITERS:,} "
                      f"resamples):",
                  table(["metric", "PPL A", "PPL B", "A/B", "95% CI", "p", "windows", "verdict"],
                        rows)]
    if result["accuracy"]:
        rows = [[r["task"], fmt_num(r["acc_a"], 3), fmt_num(r["acc_b"], 3), r["only_a"],
                 r["only_b"], r["n"], fmt_num(r["p_value"], 4),
                 _verdict(r["significant"], r["acc_a"] > r["acc_b"])]
                for r in result["accuracy"]]
        lines += ["", "accuracy, McNemar's exact test on the examples the runs disagree on:",
                  table(["task", "acc A", "acc B", "only A right", "only B right", "n", "p",
                         "verdict"], rows)]
    for note in result["skipped"]:
        lines.append(f"not compared: {note}")
    lines.append("significant: the 95% interval of A/B excludes 1 (perplexity), p < 0.05 "
                 "(accuracy).")
    return "\n".join(lines)
