"""The phantom findings scorer: planted facts recovered from reports, and planted mistakes counted."""

import pytest

from peftmed.data import phantom
from peftmed.report.findings import facts_from_findings, facts_from_text, findings_scores

LIVER = {"region": "abdomen", "lesions": [{"organ": "liver", "side": "right", "size_class": "small"}]}
NORMAL_CHEST = {"region": "chest", "lesions": []}


def test_every_generated_reference_report_parses_to_its_planted_findings():
    recs = phantom.load("train", n_images=60, questions_per_image=1, seed=3)
    reports = [r.extra["report"] for r in recs]
    findings = [r.extra["findings"] for r in recs]
    assert {f["region"] for f in findings} == {"head", "chest", "abdomen"}
    assert any(len(f["lesions"]) > 1 for f in findings) and any(not f["lesions"] for f in findings)
    for text, planted in zip(reports, findings):
        assert facts_from_text(text) == facts_from_findings(planted), text
    s = findings_scores(reports, findings)
    assert s["findings_f1"] == 1.0 and s["presence_acc"] == 1.0


def test_parser_tolerates_word_piece_spacing():
    text = ("technique : axial contrast - enhanced ct of the abdomen. findings : there is a 2. 6 cm hypodense "
            "small lesion in the central part of the liver. impression : 1 focal lesion ( liver ).")
    assert facts_from_text(text) == facts_from_findings(LIVER)


def test_wrong_side_counts_as_a_false_and_a_missed_lesion():
    pred = "Technique: axial CT of the abdomen. There is a small lesion in the upper part of the spleen."
    s = findings_scores([pred], [LIVER])
    # predicted facts: region (right), lesion spleen (wrong), size spleen (wrong) -> P = 1/3
    # planted facts: region, lesion liver, size liver -> R = 1/3
    assert s["findings_precision"] == pytest.approx(1 / 3)
    assert s["findings_recall"] == pytest.approx(1 / 3)
    assert s["findings_f1"] == pytest.approx(1 / 3)
    assert s["findings_f1_region"] == 1.0 and s["findings_f1_lesion"] == 0.0
    assert s["presence_acc"] == 1.0  # it did say there is a lesion


def test_wrong_size_keeps_the_location_fact():
    pred = "axial ct of the abdomen. there is a large lesion in the lower part of the liver."
    s = findings_scores([pred], [LIVER])
    assert s["findings_f1_lesion"] == 1.0 and s["findings_f1_size"] == 0.0
    assert s["findings_f1"] == pytest.approx(2 / 3)


def test_missed_lesion_and_false_alarm():
    s = findings_scores(["axial ct of the abdomen. impression: no focal lesion.",
                         "axial ct of the chest. there is a small lesion in the central part of the left lung."],
                        [LIVER, NORMAL_CHEST])
    # study 1: predicted region + normal, planted region + lesion + size; study 2: predicted region +
    # lesion + size, planted region + normal. TP = 2 regions; predicted 5; planted 5
    assert s["findings_precision"] == pytest.approx(2 / 5) and s["findings_recall"] == pytest.approx(2 / 5)
    assert s["presence_acc"] == 0.0
    assert s["findings_f1_normal"] == 0.0


def test_empty_prediction_scores_zero():
    s = findings_scores([""], [LIVER])
    assert s["findings_f1"] == 0.0 and s["findings_recall"] == 0.0 and s["presence_acc"] == 0.0
