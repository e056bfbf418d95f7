"""evaluate(): answers every record, matches predictions to questions by qid, scores through
peftmed.metrics, writes predictions and metrics JSON."""

import json

import pytest
import torch
from train_fakes import build_fake, make_records

import peftmed
from peftmed.data import normalize_answer
from peftmed.train import baseline_scores, evaluate


def test_predictions_are_keyed_by_qid_and_scored(fake_registry, records, tmp_path):
    pm = build_fake(registry=fake_registry)
    result = evaluate(pm, records, batch_size=5, num_beams=1)
    assert set(result.predictions) == {r.qid for r in records}
    from peftmed.data import VQADataset, collate

    pm.eval()
    with torch.no_grad():
        direct = pm.generate(collate([VQADataset(records, 8)[i] for i in range(len(records))]))
    pm.train()
    assert [result.predictions[r.qid] for r in records] == direct  # batching and order do not matter
    closed = [r for r in records if r.answer_type == "CLOSED"]
    expected = sum(normalize_answer(result.predictions[r.qid]) == normalize_answer(r.answer) for r in closed)
    assert result.scores["acc_closed"] == pytest.approx(expected / len(closed))
    assert result.scores["n"] == len(records)

    preds, metrics = result.write(tmp_path)
    rows = json.loads(preds.read_text())
    assert {"qid", "question", "answer", "prediction"} <= set(rows[0])
    assert {r["qid"]: r["prediction"] for r in rows} == result.predictions
    assert json.loads(metrics.read_text())["acc_overall"] == result.scores["acc_overall"]
    assert pm.training  # evaluation puts the model back in training mode


def test_limit_and_bad_input(fake_registry, records):
    pm = build_fake(registry=fake_registry)
    assert len(evaluate(pm, records, limit=7).predictions) == 7
    with pytest.raises(peftmed.ConfigError, match="nothing to evaluate"):
        evaluate(pm, [])
    pm.base_model.generate = lambda batch, **kw: ["yes"]
    with pytest.raises(peftmed.ConfigError, match="returned 1 predictions for a batch of 4 questions"):
        evaluate(pm, records, batch_size=4)


def test_majority_baseline_scores_on_the_same_test_set():
    train, test = make_records(48), make_records(24, seed=1, prefix="t")
    scores = baseline_scores(train, test)
    assert scores["n"] == 24
    assert scores["acc_closed"] == pytest.approx(0.5)  # yes and no are equally frequent in both sets
