"""What separates signal from noise in a bench: confidence intervals, paired tests, seeds.

Every recipe is scored on the same test records, so comparisons are paired. For each recipe the task
gives a per-record score whose mean is its primary score (Med-VQA: 1 for a correct answer, else 0; report
generation: the report's ROUGE-L). With several seeds a record's score is its mean over the seeds.

- 95% confidence interval of the primary score: a bootstrap over records (``scipy.stats.bootstrap``,
  percentile method, 2,000 resamples, seeded).
- Paired comparison of two recipes on the same records: McNemar's exact test for right/wrong scores
  (``scipy.stats.binomtest`` on the discordant pairs, pooled over seeds), a paired permutation test of the
  mean difference otherwise (``scipy.stats.permutation_test``). Two-sided p-values.
- Naming a winner: the best recipe is compared with every other; Holm's step-down correction keeps the
  family-wise error at 5%; a winner is named only if it is significantly better than all of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05
RESAMPLES = 2000


@dataclass
class RecordScores:
    """One recipe's per-record scores: ``values[seed][record id]``; ``binary`` when they are 0/1."""

    values: Mapping[int, Mapping[str, float]]
    binary: bool

    def mean_per_record(self, ids: Sequence[str]) -> np.ndarray:
        """Each record's score averaged over the seeds, in ``ids`` order."""
        seeds = list(self.values)
        return np.array([np.mean([self.values[s][i] for s in seeds]) for i in ids], dtype=float)

    def paired(self, other: RecordScores, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(self, other) scores paired by (seed, record); a recipe run with one seed only (frozen: no
        training, so no seed) is paired with each of the other's seeds."""
        a, b = [], []
        for seed in sorted(set(self.values) | set(other.values)):
            va = self.values.get(seed, next(iter(self.values.values())) if len(self.values) == 1 else None)
            vb = other.values.get(seed, next(iter(other.values.values())) if len(other.values) == 1 else None)
            if va is None or vb is None:
                continue
            a += [va[i] for i in ids]
            b += [vb[i] for i in ids]
        return np.array(a, dtype=float), np.array(b, dtype=float)


def bootstrap_ci(values: np.ndarray, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=float)
    if len(values) < 2 or np.all(values == values[0]):
        m = float(values.mean()) if len(values) else math.nan
        return m, m
    res = bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=RESAMPLES, method="percentile",
                    rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_p(a: np.ndarray, b: np.ndarray, binary: bool, seed: int = 0) -> float:
    """Two-sided p-value that paired scores ``a`` and ``b`` have the same mean."""
    from scipy.stats import binomtest, permutation_test

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if binary:
        better, worse = int(np.sum(a > b)), int(np.sum(a < b))
        n = better + worse
        return 1.0 if n == 0 else float(binomtest(better, n, 0.5).pvalue)
    if np.allclose(a, b):
        return 1.0
    res = permutation_test((a, b), lambda x, y: np.mean(x - y), permutation_type="samples", n_resamples=RESAMPLES,
                           alternative="two-sided", rng=np.random.default_rng(seed))
    return float(res.pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control), in the input order."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [1.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def seed_spread(values: Sequence[float]) -> float | None:
    """Sample standard deviation over seeds (None with one seed)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.std(vals, ddof=1)) if len(vals) > 1 else None
