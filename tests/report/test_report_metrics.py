"""Report metrics equal pycocoevalcap's on fixed radiology report pairs (its PTB tokenizer and scorers, as
R2Gen and the report-generation papers use them), METEOR included where Java runs; without Java METEOR is
reported unavailable, never approximated."""

import pytest

from peftmed.metrics.vqa import MetricError
from peftmed.report import metrics
from peftmed.report.metrics import caption_scores, report_scores, tokenize
from peftmed.report.records import ReportRecord

PAIRS = [  # (generated, reference)
    ("The heart size is normal. The lungs are clear.", "Heart size is normal. Lungs are clear without focal consolidation."),
    ("No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax."),
    ("There is a 3.4 cm mass in the right upper lobe.", "A 3.4 cm spiculated mass is seen in the right upper lobe."),
    ("Mild cardiomegaly.", "The cardiac silhouette is mildly enlarged."),
    ("The mediastinum is unremarkable.", "Mediastinal contours are within normal limits."),
    ("Left lower lobe atelectasis.", "Atelectasis in the left lower lobe, no effusion."),
    ("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality."),
    ("Degenerative changes of the thoracic spine.", "Mild degenerative changes are noted in the thoracic spine."),
    ("The liver is enlarged.", "Hepatomegaly without focal lesion."),
    ("Small right pleural effusion.", "A small right-sided pleural effusion is present."),
    ("There is a nasogastric tube in the stomach.", "The nasogastric tube terminates in the stomach."),
    ("Pulmonary vascular congestion.", "Mild pulmonary vascular congestion, no edema."),
    ("No fracture is seen.", "No acute fracture or dislocation."),
    ("The kidneys are normal in size.", "Both kidneys are normal in size without hydronephrosis."),
    ("There is a ring enhancing lesion in the left frontal lobe.", "Ring-enhancing lesion in the left frontal lobe with edema."),
    ("Free air under the diaphragm.", "Free intraperitoneal air beneath the right hemidiaphragm."),
    ("The aorta is tortuous.", "Tortuous and calcified thoracic aorta."),
    ("Bilateral interstitial opacities.", "Bilateral interstitial opacities, likely edema."),
    ("No midline shift.", "There is no midline shift or mass effect."),
    ("The lungs are clear.", "The lungs are clear."),
]


def _pycocoevalcap_directly(pairs):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    res = tok.tokenize({str(i): [{"caption": h}] for i, (h, _) in enumerate(pairs)})
    gts = tok.tokenize({str(i): [{"caption": r}] for i, (_, r) in enumerate(pairs)})
    out = {f"bleu_{k + 1}": v for k, v in enumerate(Bleu(4).compute_score(gts, res, verbose=0)[0])}
    out["rouge_l"] = Rouge().compute_score(gts, res)[0]
    out["cider"] = Cider().compute_score(gts, res)[0]
    meteor = Meteor()
    out["meteor"] = meteor.compute_score(gts, res)[0]
    return out


@pytest.fixture(scope="module")
def java():
    reason = metrics.java_status()
    if reason is not None:
        pytest.skip(reason)


def test_scores_equal_pycocoevalcap_on_fixed_report_pairs(java):
    ours = caption_scores([h for h, _ in PAIRS], [r for _, r in PAIRS])
    theirs = _pycocoevalcap_directly(PAIRS)
    assert ours["tokenizer"] == "ptb" and ours["meteor_status"].startswith("ok")
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
    assert 0.2 < ours["meteor"] < 0.5  # METEOR 1.5 with stems, synonyms and paraphrases, the jar's aggregate


def test_an_identical_report_scores_one(java):
    s = caption_scores(["The heart size is normal. No pleural effusion."],
                       ["The heart size is normal. No pleural effusion."])
    assert s["meteor"] == pytest.approx(1.0)
    assert s["rouge_l"] == pytest.approx(1.0) and s["bleu_4"] == pytest.approx(1.0, abs=1e-6)


def test_without_java_meteor_is_unavailable_not_approximated(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    monkeypatch.setattr(metrics, "_METEOR", metrics._MeteorServer())
    s = caption_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert s["meteor"] is None and s["meteor_status"].startswith("unavailable: Java is not on PATH")
    assert s["tokenizer"] == "python (no Java)"
    assert s["bleu_1"] == pytest.approx(1.0, abs=1e-6) and s["rouge_l"] == pytest.approx(1.0)


def test_the_fallback_tokenizer_lowercases_drops_punctuation_keeps_decimals():
    assert tokenize("Technique: 2.6 cm, Contrast-enhanced (LEFT).") == [
        "technique", "2.6", "cm", "contrast", "enhanced", "left"]


def test_report_scores_match_by_id_and_refuse_missing(java):
    recs = [ReportRecord(id="s1", report="no focal lesion.", views=("x.png",)),
            ReportRecord(id="s2", report="the liver is unremarkable.", views=("y.png",))]
    s = report_scores({"s2": "the liver is unremarkable", "s1": "no focal lesion"}, recs)
    assert s["bleu_1"] == pytest.approx(1.0, abs=1e-6) and s["rouge_l"] == pytest.approx(1.0)
    assert s["n"] == 2 and "pycocoevalcap" in s["metrics_version"]
    with pytest.raises(MetricError, match="s2"):
        report_scores({"s1": "x"}, recs)
    with pytest.raises(MetricError, match="s9"):
        report_scores({"s1": "x", "s2": "y", "s9": "z"}, recs)
