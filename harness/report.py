"""Plain-text tables for the terminal (no dependency beyond the standard library)."""

from __future__ import annotations

import math
from collections.abc import Sequence


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


RESULT_HEADERS = ("run", "method", "bits", "group", "PPL", "PPL/FP", "acc", "size MB",
                  "bits/weight", "wall s", "status")


def ppl_protocol(model: str, spec: dict | None) -> tuple:
    """What a stored perplexity depends on besides the weights: the model, the window and the
    token cap (the held-out split is fixed). A PPL/FP ratio divides by the fp run of the same
    protocol, never by one of another window or cap (the quick and full profiles' FP PPL
    differ by 4% on SmolLM2)."""
    ev = (spec or {}).get("eval") or {}
    return model, ev.get("seq_len"), ev.get("max_tokens")


def result_rows(entries, fp_ppl: dict[tuple, float]) -> list[list[str]]:
    """Rows of the post-run table; ``entries`` are dicts from ``Store.run_as_dict``,
    ``fp_ppl`` maps :func:`ppl_protocol` to the FP perplexity."""
    rows = []
    for e in entries:
        m = e["metrics"]
        ppl = m.get("ppl")
        ref = fp_ppl.get(ppl_protocol(e["model"], e["spec"]))
        ratio = ppl / ref if ppl is not None and ref else None
        rows.append([e["run_key"], e["method"], fmt_num(e["bits"]), fmt_num(e["group_size"]),
                     fmt_num(ppl), fmt_num(ratio), fmt_num(m.get("acc_avg"), 3),
                     fmt_num(m.get("size_mb")), fmt_num(m.get("bits_per_weight"), 3),
                     fmt_num(e["wall_s"], 0), e["status"]])
    return rows
