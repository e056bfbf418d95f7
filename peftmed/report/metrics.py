"""Report-generation metrics as the field reports them: BLEU-1..4, ROUGE-L, METEOR, CIDEr by pycocoevalcap.

R2Gen, PeFoMed and the report-generation papers score with pycocoevalcap (the COCO caption toolkit), so
peftmed calls it: its PTB tokenizer (Stanford CoreNLP's, lower-cased, punctuation tokens dropped) and its
``Bleu(4)``, ``Rouge``, ``Cider`` and ``Meteor`` scorers on the tokenised reports. The PTB tokenizer and
METEOR 1.5 run the Java jars pycocoevalcap ships (Java 8+ on PATH). Without Java:

- METEOR is reported as unavailable (``meteor`` = None, ``meteor_status`` says why), never replaced by
  an approximation under its name;
- the reports are tokenised by :func:`tokenize` (lower-cased words, punctuation dropped, decimals kept),
  recorded as ``tokenizer: "python (no Java)"``; BLEU, ROUGE-L and CIDEr are then pycocoevalcap's on those
  tokens.

One METEOR process is started per Python process and reused (its start-up loads the paraphrase tables:
about 8 s). ``METRICS_VERSION`` is written with every result.
"""

from __future__ import annotations

import atexit
import logging
import re
import shutil
import threading
from collections.abc import Mapping, Sequence

from ..metrics.vqa import MetricError, match_predictions
from .findings import findings_scores

log = logging.getLogger("peftmed.report")

METRICS_VERSION = "pycocoevalcap 1.2 (PTB tokenizer; Bleu(4), Rouge-L, Cider, Meteor 1.5)"

_TOKEN = re.compile(r"\d+(?:\.\d+)+|[^\W_]+")


def tokenize(text: str) -> list[str]:
    """The tokenizer without Java: lower-cased word tokens, punctuation dropped, decimal numbers whole."""
    return _TOKEN.findall(str(text).lower())


def java_status() -> str | None:
    """None when Java can run pycocoevalcap's jars, else why not."""
    if shutil.which("java") is None:
        return "Java is not on PATH (pycocoevalcap's PTB tokenizer and METEOR 1.5 are Java programs)"
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return "pycocoevalcap is not installed (pip install pycocoevalcap)"
    return None


def _pycoco():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as exc:
        raise MetricError("report metrics need pycocoevalcap (pip install pycocoevalcap)") from exc
    return Bleu, Rouge, Cider


def ptb_tokenize(texts: dict[str, list[str]]) -> tuple[dict[str, list[str]], str]:
    """{id: [text, ...]} tokenised as pycocoevalcap does (PTB, Java), else by :func:`tokenize`; returns the
    tokenised texts and the name of the tokenizer used."""
    reason = java_status()
    if reason is None:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        try:
            return PTBTokenizer().tokenize({k: [{"caption": t} for t in v] for k, v in texts.items()}), "ptb"
        except (OSError, ValueError) as exc:  # e.g. a read-only site-packages (the tokenizer writes a temp file)
            reason = f"the PTB tokenizer failed: {exc}"
    log.warning("report metrics: %s; tokenising without Java", reason)
    return {k: [" ".join(tokenize(t)) for t in v] for k, v in texts.items()}, "python (no Java)"


class _MeteorServer:
    """pycocoevalcap's Meteor (one Java process), started on first use and reused by this process."""

    def __init__(self):
        self._meteor = None
        self._error: str | None = None
        self._lock = threading.Lock()

    def score(self, gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float | None, str]:
        with self._lock:
            if self._error is None and self._meteor is None:
                reason = java_status()
                if reason is not None:
                    self._error = reason
                else:
                    try:
                        from pycocoevalcap.meteor.meteor import Meteor

                        self._meteor = Meteor()
                        atexit.register(self.close)
                    except OSError as exc:
                        self._error = f"METEOR could not start: {exc}"
            if self._error is not None:
                return None, f"unavailable: {self._error}"
            try:
                value, _ = self._meteor.compute_score(gts, res)
            except (OSError, ValueError) as exc:  # a broken pipe, an unparsable line
                self._error = f"METEOR failed: {exc}"
                return None, f"unavailable: {self._error}"
            return float(value), "ok (METEOR 1.5, pycocoevalcap)"

    def close(self) -> None:
        if self._meteor is not None:
            meteor, self._meteor = self._meteor, None
            try:
                meteor.meteor_p.stdin.close()
                meteor.meteor_p.kill()
                meteor.meteor_p.wait(timeout=10)
            except Exception:  # the process may already be gone at interpreter exit
                pass


_METEOR = _MeteorServer()


# ---- everything at once ----------------------------------------------------------------------------
def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> dict:
    """BLEU-1..4, ROUGE-L, METEOR and CIDEr (pycocoevalcap) of predictions against their reference report(s).

    Also returns ``tokenizer`` (``"ptb"``, or the fallback used without Java) and ``meteor_status``.
    """
    if len(predictions) != len(references):
        raise MetricError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise MetricError("nothing to score: no predictions")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, r in enumerate(refs):
        if not r:
            raise MetricError(f"prediction {i} has no reference")
    keys = [str(i) for i in range(len(predictions))]
    res, tok = ptb_tokenize({k: [str(p)] for k, p in zip(keys, predictions)})
    gts, _ = ptb_tokenize({k: [str(x) for x in r] for k, r in zip(keys, refs)})
    Bleu, Rouge, Cider = _pycoco()
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out: dict = {f"bleu_{k + 1}": float(v) for k, v in enumerate(bleu)}
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    out["meteor"], out["meteor_status"] = _METEOR.score(gts, res)
    out["tokenizer"] = tok
    return out


def record_rouge(predictions: Mapping[str, str], records: Sequence) -> dict[str, float]:
    """Per report (by id): its ROUGE-L (pycocoevalcap, PTB tokens); their mean is ``rouge_l``."""
    pairs = match_predictions(predictions, records)
    ids = [r.id for r, _ in pairs]
    res, _ = ptb_tokenize({i: [str(p)] for i, (_, p) in zip(ids, pairs)})
    gts, _ = ptb_tokenize({i: [r.report] for i, (r, _) in zip(ids, pairs)})
    _, Rouge, _ = _pycoco()
    _, per = Rouge().compute_score(gts, res)
    return {i: float(v) for i, v in zip(list(gts), per)}


def report_scores(predictions: Mapping[str, str], records: Sequence) -> dict:
    """Scores of generated reports (keyed by record id) against the records' reports.

    Predictions are matched to records by id (an unknown or missing id is an error). Records with
    planted phantom findings (``extra["findings"]``) also get the findings scores of
    ``peftmed.report.findings.findings_scores``.
    """
    pairs = match_predictions(predictions, records)
    scores: dict = caption_scores([p for _, p in pairs], [r.report for r, _ in pairs])
    if all("findings" in getattr(r, "extra", {}) for r, _ in pairs):
        scores.update(findings_scores([p for _, p in pairs], [r.extra["findings"] for r, _ in pairs]))
    scores.update(n=len(pairs), metrics_version=METRICS_VERSION)
    return scores
