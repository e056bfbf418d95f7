"""MISS model: exact miss-base size, the VQA protocol on miss-tiny (loss, backward, greedy/beam generation,
ranking), grouped cross-attention equals per-row encoder states, and a tiny model that learns answers."""

import logging

import pytest
import torch

import peftmed
from peftmed.backbones.miss import MissForVQA
from peftmed.backbones.miss.generation import beam_search


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(seed=0, **options) -> MissForVQA:
    torch.manual_seed(seed)
    return peftmed.build_backbone("miss-tiny", **options)


def test_miss_base_has_exactly_the_papers_parameter_count_on_meta_device():
    model = peftmed.build_backbone("miss-base", device="meta")
    count = lambda m: sum(p.numel() for p in m.parameters())  # parameters() counts the tied LM head once
    assert count(model.visual_encoder) == 86_339_328
    assert count(model.text_encoder) == 137_258_496
    assert count(model.text_decoder) == 137_881_148
    assert count(model) == 361_478_972
    assert model.visual_encoder.pos_embed.shape[1] == 901  # 30 x 30 patches + CLS at 480 px
    assert model.text_decoder.cls.predictions.decoder.weight is model.text_decoder.bert.embeddings.word_embeddings.weight
    assert model.peftmed_backbone == "miss-base"


def test_layernorm_tuning_of_miss_base_is_about_004_percent():
    pm = peftmed.apply(peftmed.build_backbone("miss-base", device="meta"), "*=layernorm(fused=false)",
                       keep_base=False)  # meta tensors hold no data to keep
    report = pm.trainable_report()
    assert report.total_base == 361_478_972
    assert 0.035 < report.percent < 0.045, report


def test_loss_backward_reaches_every_component():
    model = tiny()
    batch = model.example_batch(8)
    loss = model.compute_loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for comp in ("visual_encoder", "text_encoder", "text_decoder"):
        grads = [p.grad for p in getattr(model, comp).parameters()]
        assert all(g is not None for g in grads), comp
        assert sum(g.abs().sum() for g in grads) > 0, comp
    model.eval()
    assert torch.allclose(model(batch), model.compute_loss(batch))


def test_label_smoothing_changes_the_loss():
    a, b = tiny(seed=3), tiny(seed=3, label_smoothing=0.0)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    batch = a.example_batch(4)
    assert a.config.label_smoothing == 0.1
    assert not torch.allclose(a.compute_loss(batch), b.compute_loss(batch))


def test_grouped_cross_attention_equals_repeated_encoder_states():
    model = tiny().eval()
    batch = model.example_batch(2)
    states, mask = model.encode(batch)
    g = 3
    ids = torch.randint(5, len(model.tokenizer), (2 * g, 4))
    grouped = model.text_decoder(ids, None, states, mask, cross_kv=model.text_decoder.bert.cross_kv(states), group=g)
    plain = model.text_decoder(ids, None, states.repeat_interleave(g, 0), mask.repeat_interleave(g, 0))
    torch.testing.assert_close(grouped, plain, atol=1e-5, rtol=1e-5)


def greedy_oracle(model, batch, steps):
    """Greedy decoding the slow way: full decoder pass on plain encoder states, argmax, stop at [SEP]."""
    tok = model.tokenizer
    states, mask = model.encode(batch)
    out = []
    for b in range(states.shape[0]):
        ids = [tok.dec_id]
        for _ in range(steps):
            logits = model.text_decoder(torch.tensor([ids]), None, states[b : b + 1], mask[b : b + 1])
            ids.append(int(logits[0, -1].argmax()))
            if ids[-1] == tok.sep_id:
                break
        out.append(tok.decode(ids[1:]))
    return out


def test_greedy_generation_matches_the_slow_oracle_and_is_deterministic():
    model = tiny(seed=1).eval()
    batch = model.example_batch(3, with_answers=False)
    with torch.no_grad():
        expected = greedy_oracle(model, batch, 10)
    got = model.generate(batch, num_beams=1, max_new_tokens=10)
    assert got == expected
    assert model.generate(batch, num_beams=3) == model.generate(batch, num_beams=3)


def test_beam_search_limits_length():
    model = tiny(seed=2).eval()
    batch = model.example_batch(2, with_answers=False)
    states, mask = model.encode(batch)
    for beams in (1, 3):
        ids = beam_search(model, states, mask, num_beams=beams, max_new_tokens=4)
        assert len(ids) == 2 and all(len(row) <= 4 for row in ids), ids
        assert all(model.tokenizer.sep_id not in row for row in ids)  # stops at [SEP], which is not returned


@pytest.fixture(scope="module")
def trained():
    """miss-tiny fitted on four question/answer pairs (what a user expects training to do)."""
    torch.manual_seed(0)
    model = peftmed.build_backbone("miss-tiny", hidden_dropout=0.0, attention_dropout=0.0)
    batch = model.example_batch(4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = model.compute_loss(batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), batch, first, loss.item()


def test_training_lowers_the_loss_and_generation_returns_the_learnt_answers(trained):
    model, batch, first, last = trained
    assert last < 0.5 * first
    assert model.generate(batch, num_beams=3) == batch["answers"]
    assert model.generate(batch, num_beams=1) == batch["answers"]


def test_rank_answers_picks_the_learnt_answer(trained):
    model, batch, _, _ = trained
    candidates = ["maybe", "yes", "no", "chest", "left upper lobe", "right"]
    assert model.rank_answers(batch, candidates) == batch["answers"]
    with pytest.raises(peftmed.ConfigError, match="at least one candidate"):
        model.rank_answers(batch, [])


def test_long_question_is_truncated_counted_and_logged_once(caplog):
    model = tiny().eval()
    batch = model.example_batch(2)
    batch["questions"][0] = "is there " + "a large mass " * 40 + "?"
    with caplog.at_level(logging.WARNING, logger="peftmed.backbones.miss"):
        model.compute_loss(batch)
        model.generate(batch, num_beams=1, max_new_tokens=2)
    assert model.truncated_questions == 2  # one question, seen twice
    assert sum("truncated" in r.getMessage() for r in caplog.records) == 1
    states, _ = model.encode(batch)
    assert states.shape[1] == model.config.max_question_tokens == 35


def test_questions_and_images_must_agree():
    model = tiny()
    batch = model.example_batch(2)
    batch["questions"] = batch["questions"][:1]
    with pytest.raises(peftmed.PeftmedError, match="2 images but 1 questions"):
        model.compute_loss(batch)


def test_builder_respects_an_ambient_meta_device():
    """`peftmed recipe check` builds inside `with torch.device("meta")`: nothing may be allocated."""
    with torch.device("meta"):
        model = peftmed.build_backbone("miss-base")
    assert all(p.is_meta for p in model.parameters())
