"""ReportModel on miss-tiny: a few training steps lower the report loss, generation gives text,
position limits are clipped with a note, bad batches are refused."""

import logging

import pytest
import torch

import peftmed
from peftmed.data import load_records
from peftmed.errors import ConfigError, PeftmedError
from peftmed.report import DEFAULT_PROMPT, ReportDataset, ReportModel, evaluate_reports, report_collate


@pytest.fixture(scope="module")
def records():
    return load_records("phantom-report", "train", n_images=8, seed=0)


def _model(records, recipe="*=full", **options):
    torch.manual_seed(0)
    texts = [DEFAULT_PROMPT] + [r.report for r in records]
    model = peftmed.build_backbone("miss-tiny", texts=texts, **options)
    return ReportModel(peftmed.apply(model, recipe))


def _batch(records, model):
    ds = ReportDataset(records, model.image_size)
    return report_collate([ds[i] for i in range(len(records))])


def test_training_steps_lower_the_report_loss(records):
    rm = _model(records, "*=layernorm decoder=full", max_position_embeddings=128)
    batch = _batch(records, rm)
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=2e-3)

    def loss_now():
        rm.eval()  # no dropout: the before/after losses compare the weights only
        with torch.no_grad():
            return rm.compute_loss(batch).item()

    before = loss_now()
    rm.train()
    for _ in range(6):
        loss = rm.compute_loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss_now() < before - 0.3
    # the loss covers the whole report: nothing was cut at 100 tokens (reports are <= ~95 word pieces)
    assert peftmed.model.PeftModel is type(rm.model) and rm.model.truncated_answers == 0
    # the VQA answer limit is restored after each call
    assert rm.model.config.max_answer_tokens == 32


def test_generation_produces_text_within_the_token_budget(records):
    rm = _model(records, max_position_embeddings=128)
    batch = _batch(records[:2], rm)
    texts = rm.generate_report(batch, max_new_tokens=12, num_beams=2)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    assert all(len(t.split()) <= 12 for t in texts)  # a decoded word takes at least one token
    assert rm.generate(batch, max_new_tokens=5, num_beams=1) == rm.generate_report(batch, max_new_tokens=5, num_beams=1)


def test_position_limit_clips_with_a_note(records, caplog):
    with caplog.at_level(logging.WARNING, logger="peftmed.report"):
        rm = _model(records)  # miss-tiny: 64 positions
    assert rm.max_report_tokens == 63 and "max_position_embeddings" in caplog.text
    batch = _batch(records[:1], rm)
    with caplog.at_level(logging.WARNING, logger="peftmed.report"):
        texts = rm.generate_report(batch, max_new_tokens=200, num_beams=1)
    assert rm.clipped_generations == 1 and "generating at most 64 tokens" in caplog.text
    assert len(texts[0].split()) <= 64


def test_evaluate_reports_scores_by_id(records):
    rm = _model(records, max_position_embeddings=128)
    result = evaluate_reports(rm, records[:3], batch_size=2, num_beams=1, max_new_tokens=8)
    assert set(result.predictions) == {r.id for r in records[:3]}
    for key in ("bleu_4", "rouge_l", "meteor", "cider", "findings_f1", "presence_acc"):
        assert key in result.scores
    assert "BLEU-4" in result.summary()


def test_bad_input(records):
    rm = _model(records, max_position_embeddings=128)
    batch = _batch(records[:2], rm)
    with pytest.raises(PeftmedError, match="batch\\['reports'\\]"):
        rm.compute_loss({"images": batch["images"], "ids": batch["ids"]})
    with pytest.raises(PeftmedError, match="a list of 2 strings"):
        rm.compute_loss({**batch, "reports": batch["reports"][:1]})
    with pytest.raises(ConfigError, match="max_new_tokens"):
        rm.generate_report(batch, max_new_tokens=0)
    with pytest.raises(ConfigError, match="max_report_tokens"):
        ReportModel(rm.model, max_report_tokens=0)
    with pytest.raises(PeftmedError, match="cannot serve the report task"):
        ReportModel(torch.nn.Linear(2, 2))
