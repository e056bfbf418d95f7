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

import numpy as np

from . import stats
from .suites import FORGETTING_CLAIM, recipe_methods

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
            for key in ("throughput", "peak_memory_mib"):  # the bars' error bars
                row[f"{key}_sd"] = stats.seed_spread([m.get(key) for m in ok])
            row["seed_sd"] = stats.seed_spread([m.get(task.primary) for m in ok])
            row["by_seed"] = {str(m.get("seed", 0)): m.get(task.primary) for m in ok}
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
    if frozen is not None:  # which differences hold on every seed: the seeds on which a recipe beats frozen
        by_seed = {r.get("seed", 0): r.get(task.primary) for r in rows
                   if r["label"] == frozen["label"] and r["provider"] == "peftmed" and r["status"] == "ok"}
        for row in out:
            if row["label"] == frozen["label"] or row["status"] != "ok":
                continue
            mine = [(r.get(task.primary), by_seed.get(r.get("seed", 0), by_seed.get(min(by_seed), None) if by_seed
                                                      else None))
                    for r in rows if r["label"] == row["label"] and r["provider"] == row["provider"]
                    and r["status"] == "ok"]
            pairs = [(a, b) for a, b in mine if a is not None and b is not None]
            if pairs:
                row["seeds_above_frozen"] = [sum(a > b for a, b in pairs), len(pairs)]
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


def forgetting(summary: Sequence[dict[str, Any]], task, records: Sequence, predictions) -> None:
    """The transfer protocol's forgetting: each recipe's primary score on the source domain after adapting to the
    target, minus the source model's own (the frozen recipe's rows: the source models themselves), with a 95%
    bootstrap interval over the source records and a paired test (records as units, seeds averaged). Stored in
    each row as ``source_<primary>``, ``forgetting``, ``forgetting_ci_low`` / ``_high`` and ``p_forgetting``."""
    if task.record_scores is None:
        return
    ids = [r.qid for r in records]

    def scores(row):
        per_seed = {s: task.record_scores(predictions[(row["label"], row["provider"], s)], records)
                    for s in row.get("seeds") or [0] if (row["label"], row["provider"], s) in predictions}
        return stats.RecordScores(per_seed, task.binary) if per_seed else None

    frozen = _reference(summary, lambda r: r.get("trainable") == 0)
    base = scores(frozen) if frozen is not None else None
    if base is None:
        return
    before = base.mean_per_record(ids)
    frozen[f"source_{task.primary}"] = float(before.mean())
    for row in summary:
        if row is frozen or row["status"] != "ok" or row["provider"] != "peftmed":
            continue
        mine = scores(row)
        if mine is None:
            continue
        after = mine.mean_per_record(ids)
        row[f"source_{task.primary}"] = float(after.mean())
        row["forgetting"] = float(after.mean() - before.mean())
        row["forgetting_ci_low"], row["forgetting_ci_high"] = stats.bootstrap_ci(after - before)
        row["p_forgetting"] = stats.paired_p(after, before, task.binary)
        per_seed = [np.mean([mine.values[s][i] for i in ids]) - np.mean([base.values[s][i] for i in ids])
                    for s in mine.values if s in base.values]
        row["seeds_forgetting"] = [sum(d < 0 for d in per_seed), len(per_seed)]


def forgetting_text(summary: Sequence[dict[str, Any]], task, records: Sequence | None = None,
                    predictions=None) -> str | None:
    """Which recipes forget the source domain significantly (Holm-adjusted over the recipes), and whether
    LayerNorm-tuning forgets less than LoRA and full tuning (the LayerNorm paper's claim; paired tests of the
    source-domain scores, Holm-adjusted)."""
    rows = [r for r in summary if r.get("p_forgetting") is not None]
    if not rows:
        return None
    adjusted = stats.holm([r["p_forgetting"] for r in rows])
    forgot = [(r, p) for r, p in zip(rows, adjusted) if p < stats.ALPHA and r["forgetting"] < 0
              and _every_seed(r.get("seeds_forgetting"))]
    if forgot:
        text = "forgetting (source domain after adapting; Holm-adjusted and on every seed): " + ", ".join(
            f"{r['label']} {r['forgetting']:+.3f}" for r, _ in sorted(forgot, key=lambda x: x[0]["forgetting"]))
        text += " forget significantly"
    else:
        text = ("forgetting: no recipe lowers its source-domain score significantly on every seed (Holm-adjusted "
                "p < 0.05 and every seed)")
    kept = [r["label"] for r in rows if r not in [f for f, _ in forgot]]
    if forgot and kept:
        text += f"; not shown for {', '.join(kept[:6])}"
    if records is not None and predictions is not None:
        claim = _layernorm_claim(summary, task, records, predictions)
        if claim:
            text += "\n" + claim
    return text


def _layernorm_claim(summary, task, records, predictions) -> str | None:
    """LayerNorm-tuning against LoRA and full tuning on the source domain (paired, Holm-adjusted)."""
    ids = [r.qid for r in records]
    own = {r["label"]: r for r in summary if r["provider"] == "peftmed" and r["status"] == "ok"
           and r.get("forgetting") is not None}
    claimed, others = FORGETTING_CLAIM
    ln = next((r for r in own.values() if recipe_methods(str(r.get("recipe"))) == {claimed}), None)
    if ln is None:
        return None
    rivals = [r for r in own.values() if r is not ln and recipe_methods(str(r.get("recipe"))) & set(others)]
    if not rivals:
        return None

    def scores(row):
        per_seed = {s: task.record_scores(predictions[(row["label"], "peftmed", s)], records)
                    for s in row.get("seeds") or [0] if (row["label"], "peftmed", s) in predictions}
        return stats.RecordScores(per_seed, task.binary).mean_per_record(ids)

    def by_seed(row):
        return {s: np.mean(list(task.record_scores(predictions[(row["label"], "peftmed", s)], records).values()))
                for s in row.get("seeds") or [0] if (row["label"], "peftmed", s) in predictions}

    mine, mine_seeds = scores(ln), by_seed(ln)
    pvals = [stats.paired_p(mine, scores(r), task.binary) for r in rivals]
    adjusted = stats.holm(pvals)
    parts = []
    for r, p in zip(rivals, adjusted):
        diff = ln["forgetting"] - r["forgetting"]
        theirs = by_seed(r)
        steady = all((mine_seeds[s] - theirs[s]) * diff > 0 for s in mine_seeds if s in theirs)
        if p < stats.ALPHA and steady:
            verdict = "forgets less" if diff > 0 else "forgets more"
        else:
            verdict = "no difference that holds on every seed" if p < stats.ALPHA else "no significant difference"
        parts.append(f"vs {r['label']}: {verdict} ({diff:+.3f}, Holm-adjusted p {_p_text(p)})")
    return "LayerNorm-tuning on the source domain " + "; ".join(parts)


def _every_seed(counts) -> bool:
    """``[k, n]``: the effect showed on k of n seeds; True when it showed on every one."""
    return bool(counts) and counts[0] == counts[1] and counts[1] > 0


def _p_text(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _reference(rows, test) -> dict | None:
    return next((r for r in rows if r["provider"] == "peftmed" and r["status"] == "ok" and test(r)), None)


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
    mine = best.get("by_seed") or {}
    if len(mine) > 1:  # with several seeds a winner is also the best on every one of them
        tied += [r["label"] for r in others if r["label"] not in tied and any(
            v is not None and mine.get(k) is not None and v >= mine[k] for k, v in (r.get("by_seed") or {}).items())]
    if not tied:
        return {"best": best["label"], "significant": True,
                "text": f"winner: {best['label']} ({name} {best[task.primary]:.3f}{ci}), significantly better than every "
                        f"other recipe (paired tests, Holm-adjusted p < {stats.ALPHA} for all {len(others)}"
                        f"{', and the best on every seed' if len(mine) > 1 else ''})"}
    shown = ", ".join(tied[:6]) + (" ..." if len(tied) > 6 else "")
    return {"best": best["label"], "significant": False,
            "text": f"no significant difference at the top: {best['label']} ({name} {best[task.primary]:.3f}{ci}) is not "
                    f"significantly better than {shown} (paired tests, Holm-adjusted p >= {stats.ALPHA}"
                    f"{', or not on every seed' if len(mine) > 1 else ''})"}


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
    several = any((r.get("seeds_above_frozen") or [0, 1])[1] > 1 for r in rows)
    better = [r for r, p in zip(rows, adjusted) if p < stats.ALPHA and r[task.primary] > frozen[task.primary]
              and (not several or _every_seed(r.get("seeds_above_frozen")))]
    where = " and on every seed" if several else ""
    if not better:
        return (f"no recipe is significantly better than frozen{where} ({name} {frozen[task.primary]:.3f}; Holm-adjusted "
                f"p < {stats.ALPHA}{where})")
    best = max(better, key=lambda r: (r[task.primary] - frozen[task.primary]) / r["trainable"])
    gain = best[task.primary] - frozen[task.primary]
    names = ", ".join(r["label"] for r in sorted(better, key=lambda r: -r[task.primary]))
    return (f"better than frozen (Holm-adjusted{where}): {names}; most {name} gained per trainable parameter: "
            f"{best['label']} (+{gain:.3f} with {int(best['trainable']):,} parameters, {best['trainable_percent']:.3f}%)")


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
