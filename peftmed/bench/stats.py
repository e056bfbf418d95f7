"""What separates signal from noise in a bench: confidence intervals, paired tests, seeds.

Every recipe is scored on the same test records, so comparisons are paired. For each recipe the task
gives a per-record score whose mean is its primary score (Med-VQA: 1 for a correct answer, else 0; report
generation: the report's ROUGE-L). With several seeds a record's score is its mean over the seeds: the
records (questions) are the units of every test, and a question's seeds stay together. Treating each
(question, seed) pair as an independent observation would count a recipe's consistent advantage on some
questions once per seed and make p-values too small (``tests/bench/test_stats.py`` simulates it).

- 95% confidence interval of the primary score: a bootstrap over records (``scipy.stats.bootstrap``,
  percentile method, 2,000 resamples, seeded), each record's score averaged over its seeds.
- Paired comparison of two recipes on the same records, on each record's difference averaged over seeds:
  with one seed and right/wrong scores, McNemar's exact test (``scipy.stats.binomtest`` on the discordant
  records); otherwise a sign-flip permutation test of the mean difference (``scipy.stats.permutation_test``,
  10,000 resamples). Two-sided p-values.
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
PERMUTATIONS = 10_000


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
        """(self, other) per-record scores, each averaged over its recipe's seeds, in ``ids`` order: the
        records are the paired units (a recipe run with one seed only, frozen, is its one run)."""
        return self.mean_per_record(ids), other.mean_per_record(ids)

    @property
    def n_seeds(self) -> int:
        return len(self.values)


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


def paired_p(a: np.ndarray, b: np.ndarray, binary: bool, seed: int = 0, resamples: int = PERMUTATIONS) -> float:
    """Two-sided p-value that paired per-record scores ``a`` and ``b`` have the same mean. ``binary``: both are
    0/1 (one seed each): McNemar's exact test; otherwise (scores averaged over seeds, continuous scores) a
    sign-flip permutation test of the mean per-record difference."""
    from scipy.stats import binomtest, permutation_test

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    exact01 = binary and np.all((a == 0) | (a == 1)) and np.all((b == 0) | (b == 1))
    if exact01:
        better, worse = int(np.sum(a > b)), int(np.sum(a < b))
        n = better + worse
        return 1.0 if n == 0 else float(binomtest(better, n, 0.5).pvalue)
    d = a - b
    if np.allclose(d, 0):
        return 1.0
    res = permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
                           vectorized=True, n_resamples=resamples, alternative="two-sided",
                           rng=np.random.default_rng(seed))
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
