"""Report metrics on hand-computed examples (values derived by hand from the published definitions
and pycocoevalcap's code; pycocoevalcap itself needs Java and is not installed)."""

import math

import pytest

from peftmed.metrics.vqa import MetricError
from peftmed.report.metrics import bleu, caption_scores, cider, meteor, report_scores, rouge_l, tokenize
from peftmed.report.records import ReportRecord


def test_tokenize_lowercases_drops_punctuation_keeps_decimals():
    assert tokenize("Technique: 2.6 cm, Contrast-enhanced (LEFT).") == [
        "technique", "2.6", "cm", "contrast", "enhanced", "left"]


def test_perfect_prediction_scores_one_on_bleu_and_rouge():
    s = caption_scores(["The cat sat on the mat."], ["the cat sat on the mat"])
    for k in range(1, 5):
        assert s[f"bleu_{k}"] == pytest.approx(1.0, abs=1e-6)
    assert s["rouge_l"] == pytest.approx(1.0)
    # one chunk of six matches: 1 - 0.5 * (1/6)^3
    assert s["meteor"] == pytest.approx(1 - 0.5 / 216)


def test_short_hypothesis_hand_computed():
    hyp, ref = tokenize("the cat sat"), tokenize("the cat sat on the mat")
    b = bleu([hyp], [[ref]])
    bp = math.exp(1 - 6 / 3)  # brevity penalty
    assert b[0] == pytest.approx(bp, rel=1e-6)
    assert b[1] == pytest.approx(bp, rel=1e-6)
    assert b[2] == pytest.approx(bp, rel=1e-6)
    # no 4-gram: pycocoevalcap's smoothing gives (1e-15 / 1e-9) ** (1/4) of the penalty, not zero
    assert b[3] == pytest.approx(bp * 1e-6 ** 0.25, rel=1e-6)
    # LCS 3: P = 1, R = 0.5, beta 1.2
    assert rouge_l(hyp, [ref]) == pytest.approx(2.44 * 0.5 / (0.5 + 1.44))
    # P = 1, R = 0.5: Fmean = 10PR/(R+9P) = 5/9.5; one chunk of 3 matches
    assert meteor(hyp, [ref]) == pytest.approx(5 / 9.5 * (1 - 0.5 / 27))


def test_bleu_is_corpus_level_not_a_mean_of_sentences():
    hyps = [tokenize("a b c d"), tokenize("x y")]
    refs = [[tokenize("a b c d")], [tokenize("z w")]]
    b = bleu(hyps, refs)
    assert b[0] == pytest.approx(4 / 6, rel=1e-6)
    assert b[1] == pytest.approx(math.sqrt(4 / 6 * 3 / 4), rel=1e-6)


def test_meteor_fragmentation_penalty():
    # greedy exact alignment of a, b, c, d onto "c d a b" gives two chunks of two matches
    assert meteor(tokenize("a b c d"), [tokenize("c d a b")]) == pytest.approx(1 - 0.5 * (2 / 4) ** 3)
    assert meteor(tokenize("x y"), [tokenize("a b")]) == 0.0


def test_rouge_l_takes_best_precision_and_recall_over_references():
    hyp = tokenize("a b c")
    assert rouge_l(hyp, [tokenize("a b c d e f"), tokenize("x")]) == pytest.approx(rouge_l(hyp, [tokenize("a b c d e f")]))
    assert rouge_l([], [tokenize("a")]) == 0.0


def test_cider_hand_computed_two_document_corpus():
    # doc 1 matches exactly: unigram and bigram cosine 1, no 3-/4-grams -> 10 * (1 + 1 + 0 + 0) / 4 = 5
    corpus, per_doc = cider([tokenize("a b"), tokenize("c d")], [[tokenize("a b")], [tokenize("e f")]])
    assert per_doc == pytest.approx([5.0, 0.0])
    assert corpus == pytest.approx(2.5)


def test_cider_length_penalty():
    # hypothesis one bigram longer than the reference: Gaussian penalty exp(-1 / 72) on every n
    _, per_doc = cider([tokenize("a b c"), tokenize("q")], [[tokenize("a b")], [tokenize("z")]])
    assert per_doc[0] < 5.0 and per_doc[0] > 0


def test_report_scores_match_by_id_and_refuse_missing():
    recs = [ReportRecord(id="s1", report="no focal lesion.", views=("x.png",)),
            ReportRecord(id="s2", report="the liver is unremarkable.", views=("y.png",))]
    s = report_scores({"s2": "the liver is unremarkable", "s1": "no focal lesion"}, recs)
    assert s["bleu_1"] == pytest.approx(1.0, abs=1e-6) and s["rouge_l"] == pytest.approx(1.0)
    assert s["n"] == 2 and s["meteor_variant"] == "exact" and "metrics_version" in s
    with pytest.raises(MetricError, match="s2"):
        report_scores({"s1": "x"}, recs)
    with pytest.raises(MetricError, match="s9"):
        report_scores({"s1": "x", "s2": "y", "s9": "z"}, recs)
