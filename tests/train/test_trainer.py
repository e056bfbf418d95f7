"""The trainer on a tiny fake VQA model: learning, optimiser groups, schedule, accumulation, budgets,
exact resume after a kill, atomic checkpoints, NaN stop, refusing another run's checkpoint."""

import json
import math

import pytest
import torch
from train_fakes import bare_fake, build_fake, make_records

import peftmed
from peftmed.data import VQADataset
from peftmed.train import (CheckpointError, NonFiniteLossError, TrainConfig, Trainer, baseline_scores, evaluate,
                           latest_checkpoint)
from peftmed.train import checkpoint as ckpt_mod
from peftmed.train.trainer import cosine_with_warmup

BASE = dict(batch_size=8, lr=1e-2, progress=False, seed=3)


def run(pm, records, out=None, resume=False, **cfg):
    config = TrainConfig(**{**BASE, **cfg})
    trainer = Trainer(pm, VQADataset(records, 8), config, output_dir=out)
    return trainer, trainer.train(resume=resume)


def tensors(pm):
    return {k: v.detach().clone() for k, v in pm.adapter_tensors().items()}


def test_learns_and_trains_only_the_adapter(fake_registry, records):
    pm = build_fake(registry=fake_registry, dropout=0.0)
    frozen_before = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    trainer, result = run(pm, records, steps=40, lr=3e-2)
    assert result.step == 40 and result.stopped_by == "steps" and len(result.losses) == 40
    assert sum(result.losses[-5:]) / 5 < 0.6 * sum(result.losses[:5]) / 5
    learned, majority = evaluate(pm, records).scores, baseline_scores(records, records)
    assert learned["acc_overall"] > majority["acc_overall"] + 0.15
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in pm.adapter_tensors().values()}
    for n, p in pm.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n


def test_no_weight_decay_on_biases_and_norms(fake_registry, records):
    pm = build_fake(registry=fake_registry)
    trainer, _ = run(pm, records, steps=1, weight_decay=0.1)
    names = {id(p): n for n, p in pm.adapter_tensors().items()}
    by_decay: dict[float, set] = {}
    for g in trainer.optimizer.param_groups:  # one group per component and method (and decay)
        by_decay.setdefault(g["weight_decay"], set()).update(names[id(p)] for p in g["params"])
    assert by_decay[0.0] == {"vision.norm.weight", "vision.norm.bias", "head.fc1.bias", "head.fc2.bias"}
    assert "vision.q.lora_A" in by_decay[0.1] and "head.fc1.weight" in by_decay[0.1]


def test_cosine_schedule_with_warmup_is_followed(fake_registry, records):
    f = cosine_with_warmup(warmup=4, horizon=20, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(12) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(20) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    pm = build_fake(registry=fake_registry)
    _, result = run(pm, records, steps=20, warmup_steps=4, min_lr_ratio=0.1, lr=0.02)
    assert result.lrs == pytest.approx([0.02 * f(s) for s in range(20)])


def test_gradient_accumulation_equals_the_large_batch(fake_registry, records):
    a = build_fake("vision=lora(r=4,kernel=torch)+layernorm decoder=ffn", registry=fake_registry, dropout=0.0)
    b = build_fake("vision=lora(r=4,kernel=torch)+layernorm decoder=ffn", registry=fake_registry, dropout=0.0)
    _, ra = run(a, records, steps=6, batch_size=8, grad_accum=1)
    _, rb = run(b, records, steps=6, batch_size=4, grad_accum=2)
    assert rb.losses == pytest.approx(ra.losses, abs=1e-6)
    for k, v in tensors(a).items():
        torch.testing.assert_close(tensors(b)[k], v, atol=1e-6, rtol=1e-5)


def test_seed_makes_runs_reproducible(fake_registry, records):
    runs = [run(build_fake(registry=fake_registry), records, steps=8, seed=s)[1].losses for s in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_budget_by_epochs_and_by_time(fake_registry, records):
    _, result = run(build_fake(registry=fake_registry), records, epochs=2)
    assert result.step == 2 * (len(records) // 8) and result.stopped_by == "epochs" and result.epoch == 2
    _, timed = run(build_fake(registry=fake_registry), records, time_budget=0.3)
    assert timed.stopped_by == "time" and timed.train_seconds >= 0.3 and timed.step >= 1
    assert timed.lrs[-1] == BASE["lr"]  # no horizon: flat after (zero) warm-up


def test_kill_and_resume_continues_exactly(fake_registry, records, tmp_path):
    # 15 steps cross two epoch boundaries (6 global batches per epoch); the LoRA dropout and the
    # model's dropout draw from the RNG, so the states must be restored too.
    _, full = run(build_fake(registry=fake_registry), records, tmp_path / "a", steps=15, warmup_steps=3)

    pm = build_fake(registry=fake_registry)
    pm.base_model.fail_at_call = 11  # killed inside step 11, after the checkpoint of step 10
    with pytest.raises(KeyboardInterrupt):
        run(pm, records, tmp_path / "b", steps=15, warmup_steps=3, save_every=5)
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-00000010"

    fresh = build_fake(registry=fake_registry)
    with torch.no_grad():  # scrambled: the trained values must come from the checkpoint
        for p in fresh.adapter_tensors().values():
            p.normal_()
    _, resumed = run(fresh, records, tmp_path / "b", resume=True, steps=15, warmup_steps=3, save_every=5)
    assert resumed.losses == full.losses  # bit for bit on CPU
    assert resumed.lrs == full.lrs
    a = peftmed.load_adapter(bare_fake(registry=fake_registry),
                             tmp_path / "a" / "adapter")
    for k, v in tensors(a).items():
        assert torch.equal(tensors(fresh)[k], v), k


def test_interrupted_checkpoint_write_keeps_the_previous_one(fake_registry, records, tmp_path, monkeypatch):
    pm = build_fake(registry=fake_registry)
    run(pm, records, tmp_path, steps=4)
    good = latest_checkpoint(tmp_path / "checkpoints")
    good_state = ckpt_mod.read_state(good)

    real_save = torch.save

    def dying_save(obj, fh, *a, **kw):  # writes part of the file, then the "disk fills up"
        real_save(obj, fh, *a, **kw)
        fh.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint step-00000008 .*No space left on device; "
                                              r"the previous checkpoint .*step-00000004 is kept"):
        run(build_fake(registry=fake_registry), records, tmp_path, resume=True, steps=8)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)

    assert latest_checkpoint(tmp_path / "checkpoints") == good
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")] == []
    again = ckpt_mod.read_state(good)
    assert again["scheduler"] == good_state["scheduler"]
    _, resumed = run(build_fake(registry=fake_registry), records, tmp_path, resume=True, steps=8)
    assert resumed.step == 8 and len(resumed.losses) == 8


def test_checkpoint_holds_only_trainable_tensors_and_loads_without_pickle(fake_registry, records, tmp_path):
    pm = build_fake(registry=fake_registry)
    _, result = run(pm, records, tmp_path, steps=3)
    ck = result.checkpoint
    state = torch.load(ck / "trainer_state.pt", weights_only=True)
    assert set(state) == {"optimizer", "scheduler", "rng", "scaler"}
    meta = json.loads((ck / "trainer.json").read_text())
    assert meta["step"] == 3 and meta["backbone"] == "fake-vqa" and meta["batch_in_epoch"] == 3
    assert set(meta["parameters"]) == set(pm.adapter_tensors())
    from safetensors.torch import load_file

    assert set(load_file(str(ck / "adapter" / "adapter.safetensors"))) == set(pm.adapter_tensors())
    loaded = peftmed.load_adapter(bare_fake(registry=fake_registry), ck / "adapter")
    for k, v in tensors(pm).items():
        assert torch.equal(tensors(loaded)[k], v)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(fake_registry, records, tmp_path):
    pm = build_fake(registry=fake_registry)
    pm.base_model.nan_at_call = 7
    with pytest.raises(NonFiniteLossError, match=r"step 7: the loss is nan.*step-00000005"):
        run(pm, records, tmp_path, steps=10, save_every=5)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000005"
    saved = ckpt_mod.read_trainable(latest_checkpoint(tmp_path / "checkpoints"))
    assert all(torch.isfinite(p).all() for p in pm.adapter_tensors().values())  # the bad update was not applied
    assert saved.keys() == tensors(pm).keys()


def test_resume_from_another_recipe_or_backbone_is_refused(fake_registry, records, tmp_path):
    run(build_fake("vision=lora(r=4,kernel=torch) decoder=ffn", registry=fake_registry), records, tmp_path, steps=2)
    differs = r"vision: checkpoint lora\(r=4,kernel=torch\), this run lora\(r=2,kernel=torch\)"
    with pytest.raises(CheckpointError, match=differs):
        run(build_fake("vision=lora(r=2,kernel=torch) decoder=ffn", registry=fake_registry), records, tmp_path,
            resume=True, steps=4)
    with pytest.raises(CheckpointError, match="backbone 'fake-vqa', this run uses 'fake-vqa-2'"):
        run(build_fake("vision=lora(r=4,kernel=torch) decoder=ffn", registry=fake_registry, backbone="fake-vqa-2"),
            records, tmp_path, resume=True, steps=4)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        run(build_fake(registry=fake_registry), records, tmp_path / "empty", resume=True, steps=4)


@pytest.mark.parametrize("options, message", [
    (dict(steps=0), "steps must be a positive integer, got steps=0"),
    (dict(steps=None), "no training budget"),
    (dict(steps=5, warmup_ratio=1.5), "warmup_ratio must be in"),
    (dict(steps=5, precision="fp16"), "precision must be one of auto, bf16, fp32; got precision='fp16'"),
])
def test_bad_config_is_refused_naming_the_value(options, message):
    with pytest.raises(peftmed.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**{**BASE, **options})


def test_training_set_smaller_than_a_batch_is_refused(fake_registry):
    with pytest.raises(peftmed.ConfigError, match="has 4 samples, fewer than one global batch of 8"):
        run(build_fake(registry=fake_registry), make_records(4), steps=2)


def test_evaluates_every_n_steps_in_eval_mode(fake_registry, records, tmp_path):
    pm = build_fake(registry=fake_registry)
    calls = []

    def eval_fn(model, limit):
        calls.append((model.training, limit))
        return {"acc_overall": evaluate(model, records, limit=limit).scores["acc_overall"]}

    config = TrainConfig(**{**BASE, "steps": 7, "eval_every": 3, "eval_samples": 10})
    result = Trainer(pm, VQADataset(records, 8), config, output_dir=tmp_path, eval_fn=eval_fn).train()
    assert calls == [(False, 10), (False, 10)] and pm.training
    assert [e["step"] for e in result.evals] == [3, 6]
    assert json.loads((result.checkpoint / "trainer.json").read_text())["evals"] == result.evals
