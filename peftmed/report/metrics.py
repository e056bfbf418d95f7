"""Report-generation metrics as the field reports them: BLEU-1..4, ROUGE-L, METEOR, CIDEr.

Report-generation papers (R2Gen and successors) score with pycocoevalcap. pycocoevalcap's PTB
tokenizer and METEOR need Java, and nltk's METEOR needs WordNet data, neither usable here (nothing is
downloaded at run time), so the metrics are implemented from their published definitions, following
pycocoevalcap's code where it fixes a detail the papers leave open:

- tokens: lower-cased; a token is a run of letters/digits, a decimal number stays one token
  ("2.6 cm"); punctuation is dropped, as pycocoevalcap's PTB tokenizer drops punctuation tokens.
- BLEU-n (Papineni et al. 2002): corpus-level, clipped n-gram counts summed over all reports, the
  geometric mean of 1..n precisions, brevity penalty against the closest reference length
  (pycocoevalcap ``Bleu(4)``, option "closest", including its 1e-15/1e-9 smoothing of zero counts).
- ROUGE-L (Lin 2004): per report the LCS F-measure with beta = 1.2 (best precision and recall over
  references), averaged over reports (pycocoevalcap ``Rouge``).
- METEOR (Banerjee & Lavie 2005): exact-match unigram alignment only, F-mean = 10PR / (R + 9P),
  fragmentation penalty 0.5 (chunks / matches)^3, best over references, averaged. Java METEOR 1.5
  also matches stems, synonyms and paraphrases, so this figure is lower than published METEOR; it is
  recorded as ``meteor`` with ``meteor_variant = "exact"``.
- CIDEr (Vedantam et al. 2015) as pycocoevalcap ``Cider`` computes it (the CIDEr-D form: n = 1..4,
  TF-IDF with document frequencies over the scored references, clipped tf-idf overlap, Gaussian
  length penalty sigma = 6, x10); like pycocoevalcap it depends on the whole scored corpus.

``METRICS_VERSION`` is written with every result.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

from ..metrics.vqa import MetricError, match_predictions

METRICS_VERSION = "peftmed-report-metrics 1 (BLEU/ROUGE-L/CIDEr after pycocoevalcap 1.2; METEOR exact-match)"

_TOKEN = re.compile(r"\d+(?:\.\d+)+|[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens, punctuation dropped, decimal numbers whole: ``"2.6 cm."`` -> ``["2.6", "cm"]``."""
    return _TOKEN.findall(str(text).lower())


def _ngrams(tokens: Sequence[str], n_max: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, n_max + 1) for i in range(len(tokens) - n + 1))


def _pairs(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[Sequence[str]]]):
    if len(hyps) != len(refs):
        raise MetricError(f"{len(hyps)} predictions but {len(refs)} reference lists")
    if not hyps:
        raise MetricError("nothing to score: no predictions")
    for i, r in enumerate(refs):
        if not r:
            raise MetricError(f"prediction {i} has no reference")
    return zip(hyps, refs)


# ---- BLEU ------------------------------------------------------------------------------------------
def bleu(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[Sequence[str]]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenised hypotheses against their reference lists."""
    tiny, small = 1e-15, 1e-9  # pycocoevalcap's smoothing: a zero count gives ~0, never a division error
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for hyp, rs in _pairs(hyps, refs):
        counts = _ngrams(hyp, n)
        max_ref: Counter = Counter()
        for r in rs:
            for gram, c in _ngrams(r, n).items():
                max_ref[gram] = max(max_ref[gram], c)
        for gram, c in counts.items():
            correct[len(gram) - 1] += min(c, max_ref[gram])
        for k in range(n):
            guess[k] += max(0, len(hyp) - k)
        test_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in rs)[1]  # closest length, shorter on ties
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


# ---- ROUGE-L ---------------------------------------------------------------------------------------
def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyp: Sequence[str], refs: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """ROUGE-L F-measure of one hypothesis (best precision and best recall over its references)."""
    if not hyp:
        return 0.0
    precs, recs = [], []
    for r in refs:
        lcs = _lcs(r, hyp)
        precs.append(lcs / len(hyp))
        recs.append(lcs / len(r) if r else 0.0)
    p, r = max(precs), max(recs)
    if p == 0 or r == 0:
        return 0.0
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p)


# ---- METEOR (exact-match module) -------------------------------------------------------------------
def meteor(hyp: Sequence[str], refs: Sequence[Sequence[str]], alpha: float = 0.9, beta: float = 3.0,
           gamma: float = 0.5) -> float:
    """METEOR with exact unigram matches, best over references (see the module docstring)."""
    return max((_meteor_one(hyp, r, alpha, beta, gamma) for r in refs), default=0.0)


def _meteor_one(hyp, ref, alpha, beta, gamma) -> float:
    # greedy alignment, left to right: each hypothesis word takes the first unused equal reference word
    used = [False] * len(ref)
    align: list[tuple[int, int]] = []
    for i, w in enumerate(hyp):
        for j, v in enumerate(ref):
            if not used[j] and v == w:
                used[j] = True
                align.append((i, j))
                break
    m = len(align)
    if m == 0:
        return 0.0
    p, r = m / len(hyp), m / len(ref)
    fmean = p * r / (alpha * p + (1 - alpha) * r)
    chunks = 1 + sum(1 for (i0, j0), (i1, j1) in zip(align, align[1:]) if not (i1 == i0 + 1 and j1 == j0 + 1))
    return fmean * (1 - gamma * (chunks / m) ** beta)


# ---- CIDEr -----------------------------------------------------------------------------------------
def cider(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[Sequence[str]]], n: int = 4,
          sigma: float = 6.0) -> tuple[float, list[float]]:
    """Corpus CIDEr (pycocoevalcap ``Cider``) and the per-report scores."""
    pairs = list(_pairs(hyps, refs))
    ref_counts = [[_ngrams(r, n) for r in rs] for _, rs in pairs]
    df: Counter = Counter()
    for rcs in ref_counts:
        df.update({g for rc in rcs for g in rc})
    log_docs = math.log(float(len(pairs)))

    def vec(counts: Counter):
        v = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            v[k][gram] = tf * (log_docs - math.log(max(1.0, df[gram])))
            norm[k] += v[k][gram] ** 2
            if k == 1:  # pycocoevalcap counts the length in bigrams; kept for comparable figures
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for (hyp, _), rcs in zip(pairs, ref_counts):
        vh, nh, lh = vec(_ngrams(hyp, n))
        total = [0.0] * n
        for rc in rcs:
            vr, nr, lr = vec(rc)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = sum(min(x, vr[k][g]) * vr[k][g] for g, x in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * penalty
        scores.append(10.0 * sum(total) / n / len(rcs))
    return sum(scores) / len(scores), scores


# ---- everything at once ----------------------------------------------------------------------------
def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L, METEOR and CIDEr of predictions against their reference report(s)."""
    hyps = [tokenize(p) for p in predictions]
    refs = [[tokenize(r)] if isinstance(r, str) else [tokenize(x) for x in r] for r in references]
    out = {f"bleu_{k + 1}": s for k, s in enumerate(bleu(hyps, refs, 4))}
    out["rouge_l"] = sum(rouge_l(h, rs) for h, rs in zip(hyps, refs)) / len(hyps)
    out["meteor"] = sum(meteor(h, rs) for h, rs in zip(hyps, refs)) / len(hyps)
    out["cider"] = cider(hyps, refs)[0]
    return out


def report_scores(predictions: Mapping[str, str], records: Sequence) -> dict:
    """Scores of generated reports (keyed by record id) against the records' reports.

    Predictions are matched to records by id (an unknown or missing id is an error). Records with
    planted phantom findings (``extra["findings"]``) also get the findings scores of
    ``peftmed.report.findings.findings_scores``.
    """
    from .findings import findings_scores

    pairs = match_predictions(predictions, records)
    scores: dict = caption_scores([p for _, p in pairs], [r.report for r, _ in pairs])
    if all("findings" in getattr(r, "extra", {}) for r, _ in pairs):
        scores.update(findings_scores([p for _, p in pairs], [r.extra["findings"] for r, _ in pairs]))
    scores.update(n=len(pairs), meteor_variant="exact", metrics_version=METRICS_VERSION)
    return scores
