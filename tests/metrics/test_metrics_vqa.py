"""vqa_scores on hand-checked examples: qid matching, normalisation, closed P/R/F1, token F1, BLEU-1."""

import json
import math

import pytest

from peftmed.data import VQARecord
from peftmed.metrics import MetricError, bleu1, token_f1, vqa_scores, write_predictions
from peftmed.plugins import build_registry


def _rec(qid, answer, answer_type, organ="CHEST", qtype="PRES"):
    return VQARecord(qid=qid, question=f"question {qid}?", answer=answer, answer_type=answer_type,
                     image="x.png", image_id="x.png", question_type=qtype, organ=organ)


RECORDS = [
    _rec("q1", "yes", "CLOSED"), _rec("q2", "no", "CLOSED"), _rec("q3", "Yes", "CLOSED", organ="HEAD"),
    _rec("q4", "no", "CLOSED", organ="HEAD"), _rec("q5", "left lung", "OPEN", qtype="POS"),
    _rec("q6", "4.5 cm", "OPEN", organ="HEAD", qtype="SIZE"),
]
# q3 right after normalisation, q1 a false negative, q2 and q4 false positives,
# q5 right after normalisation, q6 wrong with partial token overlap
PREDICTIONS = {"q6": "5 cm", "q4": "YES", "q3": "yes.", "q5": "  Left   Lung!", "q2": "yes", "q1": "No"}


def test_hand_checked_scores():
    s = vqa_scores(PREDICTIONS, RECORDS)
    assert (s["n"], s["n_closed"], s["n_open"]) == (6, 4, 2)
    assert s["acc_closed"] == pytest.approx(1 / 4)
    assert s["acc_open"] == pytest.approx(1 / 2)
    assert s["acc_overall"] == pytest.approx(2 / 6)
    # positive class "yes": TP = q3, FP = q2 and q4, FN = q1
    assert s["closed_precision"] == pytest.approx(1 / 3)
    assert s["closed_recall"] == pytest.approx(1 / 2)
    assert s["closed_f1"] == pytest.approx(0.4)
    # q5: 1.0; q6: tokens {5, cm} vs {4, 5, cm} -> P 1, R 2/3, F1 0.8
    assert s["open_token_f1"] == pytest.approx((1.0 + 0.8) / 2)
    # q6 BLEU-1: precision 1, brevity penalty exp(1 - 3/2)
    assert s["open_bleu1"] == pytest.approx((1.0 + math.exp(-0.5)) / 2)
    assert s["by_organ"] == {"CHEST": {"n": 3, "acc": pytest.approx(1 / 3)},
                             "HEAD": {"n": 3, "acc": pytest.approx(1 / 3)}}
    assert s["by_question_type"]["POS"] == {"n": 1, "acc": 1.0}
    assert s["by_question_type"]["PRES"]["n"] == 4


def test_matching_is_by_qid_not_by_order():
    shuffled = dict(reversed(list(PREDICTIONS.items())))
    assert vqa_scores(shuffled, RECORDS) == vqa_scores(PREDICTIONS, RECORDS)
    assert vqa_scores(PREDICTIONS, list(reversed(RECORDS)))["acc_overall"] == pytest.approx(2 / 6)
    perfect = {r.qid: r.answer for r in RECORDS}
    assert vqa_scores(perfect, RECORDS)["acc_overall"] == 1.0
    assert vqa_scores(perfect, RECORDS)["closed_f1"] == 1.0


def test_unknown_missing_and_non_text_predictions_name_the_qid():
    with pytest.raises(MetricError, match="'q99'"):
        vqa_scores({**PREDICTIONS, "q99": "yes"}, RECORDS)
    partial = dict(PREDICTIONS)
    del partial["q5"]
    with pytest.raises(MetricError, match="no prediction: qid\\(s\\) 'q5'"):
        vqa_scores(partial, RECORDS)
    with pytest.raises(MetricError, match="'q1' has int"):
        vqa_scores({**PREDICTIONS, "q1": 1}, RECORDS)


def test_empty_group_scores_are_none():
    s = vqa_scores({"q1": "yes"}, RECORDS[:1])
    assert s["acc_open"] is None and s["open_token_f1"] is None and s["acc_closed"] == 1.0


def test_token_f1_and_bleu1_edge_cases():
    assert token_f1("", "") == 1.0 and token_f1("yes", "") == 0.0 and token_f1("a b", "c d") == 0.0
    assert bleu1("", "liver") == 0.0
    assert bleu1("liver liver liver", "liver") == pytest.approx(1 / 3)  # clipped counts
    assert bleu1("the left lung", "left lung") == pytest.approx(2 / 3)  # longer than ref: no penalty


def test_write_predictions_rows_and_atomic_replace(tmp_path, monkeypatch):
    path = tmp_path / "out" / "predictions.json"
    write_predictions(path, PREDICTIONS, RECORDS)
    rows = json.loads(path.read_text())
    assert [r["qid"] for r in rows] == [r.qid for r in RECORDS]
    assert rows[4] == {"qid": "q5", "question": "question q5?", "answer": "left lung",
                       "prediction": "  Left   Lung!", "answer_type": "OPEN", "correct": True}
    before = path.read_text()


    from peftmed import files


    def broken_fsync(fd):  # the data is half on disk when the disk fills up
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_predictions(path, PREDICTIONS, RECORDS)
    assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir()] == ["predictions.json"]


def test_registered_as_a_metric_plugin():
    metric = build_registry(load_entrypoints=False).get("metric", "vqa")
    assert metric.compute(PREDICTIONS, RECORDS)["acc_closed"] == pytest.approx(1 / 4)
