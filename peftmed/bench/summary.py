"""One summary row per (recipe, provider) over seeds, with the statistics of ``peftmed.bench.stats``.

A summary row holds the recipe's figures averaged over its seeds (trainable parameters, peak memory,
throughput, time, every task score), the 95% bootstrap interval of the primary score over the test
records, its spread over seeds, and paired p-values against the ``frozen`` recipe (the one that trains
nothing) and the ``full`` one (the one that trains every parameter), when the suite has them. The report,
the CSV and the plots are written from these rows.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from . import stats

AVERAGED = ("trainable", "trainable_percent", "total_params", "peak_memory_mib", "throughput", "step_time_median_s",
            "train_time_s", "steps_done", "final_loss", "eval_time_s")


def _mean(values):
    vals = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)]
    return statistics.fmean(vals) if vals else math.nan


def summarise(rows: Sequence[dict[str, Any]], task, records: Sequence,
              predictions: Mapping[tuple[str, str, int], Mapping[str, str]]) -> list[dict[str, Any]]:
    """Summary rows in suite order. ``predictions[(label, provider, seed)]`` are the jobs' predictions;
    ``records`` the test records they answer."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["provider"]), []).append(r)
    ids = [r.qid for r in records]
    scores: dict[tuple[str, str], stats.RecordScores] = {}
    out = []
    for (label, provider), members in groups.items():
        ok = [m for m in members if m["status"] == "ok"]
        first = members[0]
        row: dict[str, Any] = {"label": label, "provider": provider, "recipe": first.get("recipe"),
                               "row": first.get("row"), "status": "ok" if ok else first["status"],
                               "error": None if ok else first.get("error"), "peft_note": first.get("peft_note"),
                               "n_seeds": len(ok), "seeds": sorted(m.get("seed", 0) for m in ok)}
        if ok:
            for key in AVERAGED + tuple(c.key for c in task.columns):
                row[key] = _mean(m.get(key) for m in ok)
            row["seed_sd"] = stats.seed_spread([m.get(task.primary) for m in ok])
            per_seed = {}
            if task.record_scores is not None:
                for m in ok:
                    preds = predictions.get((label, provider, m.get("seed", 0)))
                    if preds is not None:
                        per_seed[m.get("seed", 0)] = task.record_scores(preds, records)
            if per_seed:
                scores[(label, provider)] = stats.RecordScores(per_seed, task.binary)
                values = scores[(label, provider)].mean_per_record(ids)
                row["ci_low"], row["ci_high"] = stats.bootstrap_ci(values)
        out.append(row)
    frozen = _reference(out, lambda r: r.get("trainable") == 0)
    full = _reference(out, lambda r: r.get("trainable_percent", 0) >= 100.0 - 1e-9 and r.get("trainable", 0) > 0)
    for row in out:
        mine = scores.get((row["label"], row["provider"]))
        for name, ref in (("frozen", frozen), ("full", full)):
            theirs = scores.get((ref["label"], "peftmed")) if ref is not None else None
            if mine is None or theirs is None or ref["label"] == row["label"]:
                row[f"p_vs_{name}"] = None
                continue
            a, b = mine.paired(theirs, ids)
            row[f"p_vs_{name}"] = stats.paired_p(a, b, task.binary)
    return out


def _reference(rows, test) -> dict | None:
    return next((r for r in rows if r["provider"] == "peftmed" and r["status"] == "ok" and test(r)), None)


def verdict(summary: Sequence[dict[str, Any]], task, scores_of=None) -> str:
    """The summary line: a winner only where the data say so (see ``winner``)."""
    return winner(summary, task)["text"]


def winner(summary: Sequence[dict[str, Any]], task) -> dict[str, Any]:
    """Which recipe is best by the primary score, and whether the difference is significant.

    The best recipe is compared with every other recipe by the paired tests stored in the rows (against
    frozen and full) and, for the others, recomputed by the caller (``pairwise``); Holm's correction over
    those comparisons decides. Returns ``{"best", "significant", "text"}``.
    """
    name = next(c.header for c in task.columns if c.key == task.primary)
    own = [r for r in summary if r["provider"] == "peftmed" and r["status"] == "ok"
           and not math.isnan(r.get(task.primary, math.nan))]
    if not own:
        return {"best": None, "significant": False, "text": f"no recipe finished with a {name} figure"}
    best = max(own, key=lambda r: r[task.primary])
    others = [r for r in own if r is not best]
    pvals = [r.get("p_vs_best") for r in others]
    if not others or any(p is None for p in pvals):
        return {"best": best["label"], "significant": False,
                "text": f"best {name}: {best['label']} ({best[task.primary]:.3f}); no paired test available"}
    adjusted = stats.holm(pvals)
    tied = [r["label"] for r, p in zip(others, adjusted) if p >= stats.ALPHA]
    ci = _ci_text(best)
    if not tied:
        return {"best": best["label"], "significant": True,
                "text": f"winner: {best['label']} ({name} {best[task.primary]:.3f}{ci}), significantly better than every "
                        f"other recipe (paired tests, Holm-adjusted p < {stats.ALPHA} for all {len(others)})"}
    shown = ", ".join(tied[:6]) + (" ..." if len(tied) > 6 else "")
    return {"best": best["label"], "significant": False,
            "text": f"no significant difference at the top: {best['label']} ({name} {best[task.primary]:.3f}{ci}) is not "
                    f"significantly better than {shown} (paired tests, Holm-adjusted p >= {stats.ALPHA})"}


def efficiency(summary: Sequence[dict[str, Any]], task) -> str:
    """The recipe with the most gain over frozen per trainable parameter, among those significantly better
    than frozen (Holm-adjusted over the recipes compared)."""
    name = next(c.header for c in task.columns if c.key == task.primary)
    frozen = _reference(summary, lambda r: r.get("trainable") == 0)
    if frozen is None:
        return "no frozen recipe in the suite: gains per parameter are not defined"
    rows = [r for r in summary if r["provider"] == "peftmed" and r["status"] == "ok" and r.get("trainable")
            and r.get("p_vs_frozen") is not None]
    if not rows:
        return "no paired test against frozen available"
    adjusted = stats.holm([r["p_vs_frozen"] for r in rows])
    better = [r for r, p in zip(rows, adjusted) if p < stats.ALPHA and r[task.primary] > frozen[task.primary]]
    if not better:
        return f"no recipe is significantly better than frozen ({name} {frozen[task.primary]:.3f}; Holm-adjusted p >= {stats.ALPHA})"
    best = max(better, key=lambda r: (r[task.primary] - frozen[task.primary]) / r["trainable"])
    gain = best[task.primary] - frozen[task.primary]
    return (f"most {name} gained over frozen per trainable parameter, among the {len(better)} recipe(s) significantly "
            f"better than frozen: {best['label']} (+{gain:.3f} with {int(best['trainable']):,} parameters, "
            f"{best['trainable_percent']:.3f}%)")


def pairwise(summary: Sequence[dict[str, Any]], task, records: Sequence, predictions) -> None:
    """Store in each row ``p_vs_best``: its paired p-value against the recipe with the best primary score."""
    if task.record_scores is None:
        return
    ids = [r.qid for r in records]
    own = [r for r in summary if r["provider"] == "peftmed" and r["status"] == "ok"
           and not math.isnan(r.get(task.primary, math.nan))]
    if not own:
        return
    best = max(own, key=lambda r: r[task.primary])

    def scores(row):
        per_seed = {s: task.record_scores(predictions[(row["label"], "peftmed", s)], records)
                    for s in row["seeds"] if (row["label"], "peftmed", s) in predictions}
        return stats.RecordScores(per_seed, task.binary) if per_seed else None

    top = scores(best)
    for row in own:
        if row is best or top is None:
            continue
        mine = scores(row)
        row["p_vs_best"] = None if mine is None else stats.paired_p(*mine.paired(top, ids), task.binary)


def _ci_text(row) -> str:
    if row.get("ci_low") is None:
        return ""
    return f", 95% CI {row['ci_low']:.3f}-{row['ci_high']:.3f}"
