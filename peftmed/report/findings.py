"""A clinical-accuracy proxy for phantom reports: precision/recall/F1 of the planted findings.

The phantom generator knows the ground truth of every image exactly, so a generated report can be
checked fact by fact instead of by word overlap. The facts of one study are:

  ``region:<head|chest|abdomen>``               the body part shown (the technique sentence)
  ``normal``                                    no lesion (the impression "no focal lesion")
  ``lesion:<organ>:<side>``                     one per lesion: the organ and side it lies in
  ``size:<organ>:<side>:<small|medium|large>``  one per lesion: the same, with its size bucket

Facts are multisets (two lesions in one kidney count twice). A generated report is parsed with the
phantom report's own phrases ("... a <size> lesion in the <position> of the <structure>", "of the
<region>", "no focal lesion"), after lower-casing and dropping punctuation, so the parser is robust
to the spacing a word-piece decoder produces. Ground truth comes from the record's planted findings
(``extra["findings"]``), never from parsing the reference text.

Scores: micro precision/recall/F1 over all facts (``findings_f1`` is the headline), per fact kind
(``findings_f1_region`` ...), and ``presence_acc``: the share of studies whose generated report is
right about whether there is any lesion.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence

# Structures that can carry a lesion in the phantom generator: structure -> (organ, side).
HOSTS = {
    "right hemisphere": ("brain", "right"), "left hemisphere": ("brain", "left"),
    "right lung": ("lung", "right"), "left lung": ("lung", "left"),
    "liver": ("liver", "right"), "spleen": ("spleen", "left"),
    "right kidney": ("kidney", "right"), "left kidney": ("kidney", "left"),
}
REGIONS = ("head", "chest", "abdomen")
SIZES = ("small", "medium", "large")
KINDS = ("region", "normal", "lesion", "size")

_LESION = re.compile(rf"\b({'|'.join(SIZES)}) lesion in the (?:\w+ )*?part of the ({'|'.join(HOSTS)})\b")
_REGION = re.compile(rf"\bof the ({'|'.join(REGIONS)})\b")
_NORMAL = re.compile(r"\bno focal lesion")


def _clean(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", str(text).lower()))


def facts_from_text(text: str) -> Counter:
    """The facts a (generated) phantom report states."""
    text = _clean(text)
    facts: Counter = Counter()
    region = _REGION.search(text)
    if region:
        facts[f"region:{region.group(1)}"] += 1
    for size, host in _LESION.findall(text):
        organ, side = HOSTS[host]
        facts[f"lesion:{organ}:{side}"] += 1
        facts[f"size:{organ}:{side}:{size}"] += 1
    if _NORMAL.search(text) and not any(f.startswith("lesion:") for f in facts):
        facts["normal"] += 1
    return facts


def facts_from_findings(findings: Mapping) -> Counter:
    """The facts planted in a phantom image (``record.extra["findings"]``)."""
    facts: Counter = Counter({f"region:{findings['region']}": 1})
    lesions = findings.get("lesions", [])
    for les in lesions:
        facts[f"lesion:{les['organ']}:{les['side']}"] += 1
        facts[f"size:{les['organ']}:{les['side']}:{les['size_class']}"] += 1
    if not lesions:
        facts["normal"] += 1
    return facts


def _prf(tp: int, n_pred: int, n_true: int) -> tuple[float | None, float | None, float | None]:
    p = tp / n_pred if n_pred else None
    r = tp / n_true if n_true else None
    if p is None or r is None:
        return p, r, None
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def findings_scores(predictions: Sequence[str], findings: Sequence[Mapping]) -> dict[str, float | None]:
    """Micro P/R/F1 of the facts stated in ``predictions`` against the planted ``findings``."""
    if len(predictions) != len(findings):
        raise ValueError(f"{len(predictions)} reports but {len(findings)} findings")
    tp, n_pred, n_true = Counter(), Counter(), Counter()
    presence_right = 0
    for text, planted in zip(predictions, findings):
        pred, true = facts_from_text(text), facts_from_findings(planted)
        for fact, count in pred.items():
            kind = fact.split(":", 1)[0]
            n_pred[kind] += count
            tp[kind] += min(count, true[fact])
        for fact, count in true.items():
            n_true[fact.split(":", 1)[0]] += count
        said_lesion = any(f.startswith("lesion:") for f in pred)
        presence_right += said_lesion == bool(planted.get("lesions"))
    out: dict[str, float | None] = {}
    p, r, f = _prf(sum(tp.values()), sum(n_pred.values()), sum(n_true.values()))
    out.update(findings_precision=p, findings_recall=r, findings_f1=f if f is not None else 0.0)
    for kind in KINDS:
        out[f"findings_f1_{kind}"] = _prf(tp[kind], n_pred[kind], n_true[kind])[2]
    out["presence_acc"] = presence_right / len(predictions) if predictions else None
    return out
