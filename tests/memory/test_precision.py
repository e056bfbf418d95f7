"""A bf16/fp16 frozen base with fp32 trainable tensors and optimizer states, trained under autocast."""

from __future__ import annotations

import pytest
import torch

import peftmed
from peftmed.errors import ConfigError
from peftmed.memory import autocast_for, parse_base_dtype, resolve_base_dtype, set_base_dtype
from peftmed.train import TrainConfig, Trainer

RECIPE = "vision=lora(r=4,roles=[attn.qkv,patch]) fusion=layernorm decoder=lora(r=4)+bitfit"


def _model(registry, recipe=RECIPE):
    bb = registry.backbone("miss-tiny")
    torch.manual_seed(0)
    model = bb.build()
    return model, peftmed.apply(model, recipe, backbone=bb, registry=registry)


def _batch(model):
    return model.example_inputs(4)["batch"]


@pytest.fixture(scope="module")
def registry():
    return peftmed.build_registry()


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_weights_take_the_base_dtype_and_trainables_stay_fp32(registry, dtype):
    model, pm = _model(registry)
    before = _bytes(pm)
    counts = set_base_dtype(pm, dtype)
    trainable = {id(p) for p in pm.adapter_tensors().values()}
    for name, p in pm.named_parameters():
        if id(p) in trainable:
            assert p.dtype == torch.float32 and p.requires_grad, name
        elif "norm" in name.lower() or ".ln" in name or "LayerNorm" in name:
            assert p.dtype == torch.float32, name
    frozen_linear = model.text_encoder.encoder.layer[0].intermediate.dense.weight
    assert frozen_linear.dtype == dtype
    assert counts["trainable fp32"] == pm.num_trainable()
    assert _bytes(pm) < 0.56 * before  # about half: almost everything is frozen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_base_trains_like_fp32(registry, dtype, tmp_path):
    losses = {}
    for label, base in (("fp32", None), ("low", dtype)):
        model, pm = _model(registry)
        if base is not None:
            set_base_dtype(pm, base)
        config = TrainConfig(steps=4, batch_size=4, lr=1e-3, progress=False, seed=0, warmup_steps=0)
        data = [{k: v[i] if not isinstance(v, list) else v[i] for k, v in _batch(model).items()} for i in range(4)]
        trainer = Trainer(pm, data, config, collate_fn=_collate)
        result = trainer.train()
        losses[label] = result.losses
        if base is not None:
            assert trainer.autocast_dtype == base
            assert trainer.scaler.is_enabled() == (base == torch.float16)
            states = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
            assert states and all(t.dtype == torch.float32 for t in states)  # Adam moments in fp32
            assert all(p.dtype == torch.float32 for p in pm.adapter_tensors().values())
    assert all(torch.isfinite(torch.tensor(v)) for v in losses["low"])
    for a, b in zip(losses["low"], losses["fp32"]):
        assert a == pytest.approx(b, rel=0.03)  # the same run, up to 8-bit (bf16) / 11-bit (fp16) mantissas
    assert losses["low"][-1] < losses["low"][0]  # and it learns


def _collate(items):
    return {"images": torch.stack([i["images"] for i in items]), "questions": [i["questions"] for i in items],
            "answers": [i["answers"] for i in items], "qids": list(range(len(items)))}


def test_generation_runs_in_the_base_dtype(registry):
    model, pm = _model(registry)
    set_base_dtype(pm, "bf16")
    pm.eval()
    with autocast_for(pm):
        answers = pm.generate(_batch(model), max_new_tokens=3, num_beams=1)
    assert len(answers) == 4


def test_auto_keeps_a_bf16_checkpoint_in_bf16_and_a_built_model_in_fp32(registry):
    model, pm = _model(registry)
    assert resolve_base_dtype("auto", pm) is None
    model.to(torch.bfloat16)
    assert resolve_base_dtype("auto", pm) == torch.bfloat16
    set_base_dtype(pm, resolve_base_dtype("auto", pm))
    assert all(p.dtype == torch.float32 for p in pm.adapter_tensors().values())  # trainables back to fp32


@pytest.mark.parametrize("bad", ["bf8", "int8", "half-ish"])
def test_a_bad_base_dtype_is_named(bad):
    with pytest.raises(ConfigError, match=f"one of fp32, bf16, fp16, got '{bad}'"):
        parse_base_dtype(bad)


def test_precision_fp32_contradicts_a_bf16_base():
    with pytest.raises(ConfigError, match="contradicts --base-dtype bf16"):
        TrainConfig(steps=1, precision="fp32", base_dtype="bf16")


def test_the_fp16_loss_scale_survives_a_resume(registry, tmp_path, monkeypatch):
    """The GradScaler's scale and growth tracker are part of the checkpoint: a resumed fp16 run continues with
    the scale it had (a fresh scaler would restart at 65536 and skip steps the uninterrupted run takes)."""
    real = torch.amp.GradScaler

    def trainer_for(out, steps):
        model, pm = _model(registry)
        set_base_dtype(pm, torch.float16)
        config = TrainConfig(steps=steps, batch_size=4, lr=1e-3, progress=False, seed=0, warmup_steps=0,
                             save_every=3, min_lr_ratio=1.0)  # a constant lr: a 3-step run is the 6-step run's start
        data = [{k: v[i] for k, v in _batch(model).items()} for i in range(4)]
        return Trainer(pm, data, config, collate_fn=_collate, output_dir=out)

    # a scale that starts at 1 and doubles every step: its value tells how many steps it has seen
    monkeypatch.setattr(torch.amp, "GradScaler",
                        lambda device, enabled=True: real(device, init_scale=1.0, growth_interval=1, enabled=enabled))
    whole = trainer_for(tmp_path / "whole", 6)
    losses = whole.train().losses
    first = trainer_for(tmp_path / "cut", 3)
    first.train()
    assert first.scaler.get_scale() == 8.0
    monkeypatch.undo()  # the resumed run builds the default scaler (65536), as a new process would
    resumed = trainer_for(tmp_path / "cut", 6)
    result = resumed.train(resume=True)
    assert resumed.scaler.get_scale() == whole.scaler.get_scale() == 64.0
    assert result.losses == pytest.approx(losses, rel=1e-6)
