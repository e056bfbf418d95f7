"""DDP: two CPU processes (gloo over loopback) train the same adapter as one process with the same
global batch; each rank sees its own half of every global batch; only rank 0 writes checkpoints."""

import json
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp
from train_fakes import FakePlugin, build_fake, make_records

from peftmed.data import VQADataset
from peftmed.train import TrainConfig, Trainer
from peftmed.train.trainer import TrainingInterrupted

RECIPE = "vision=lora(r=4,kernel=torch)+layernorm decoder=ffn"
STEPS = 4


def _config(batch_size):
    # Adam divides by sqrt(v) + eps: with the default eps, a gradient near zero turns last-bit
    # differences (the two-rank all-reduce's order; MKL's results also vary in the last bit with buffer
    # alignment) into update differences of order lr. eps = 1e-3 bounds that amplification, so 1e-5
    # between one process and two stays a statement about the gradients DDP averages.
    return TrainConfig(steps=STEPS, batch_size=batch_size, lr=1e-3, adam_eps=1e-3, warmup_steps=1, progress=False,
                       seed=1, save_every=2)


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import peftmed.plugins as plugins

    reg = plugins.build_registry(extra_plugins=[FakePlugin()], load_entrypoints=False)
    plugins.set_default_registry(reg)
    pm = build_fake(RECIPE, registry=reg, dropout=0.0)
    result = Trainer(pm, VQADataset(make_records(), 8), _config(4), output_dir=out).train()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump({"seen": pm.base_model.seen, "losses": result.losses}, fh)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(fake_registry, tmp_path):
    single = build_fake(RECIPE, registry=fake_registry, dropout=0.0)
    result = Trainer(single, VQADataset(make_records(), 8), _config(8), output_dir=tmp_path / "one").train()

    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)

    from safetensors.torch import load_file

    ddp = load_file(str(out / "adapter" / "adapter.safetensors"))
    one = {k: v.detach() for k, v in single.adapter_tensors().items()}
    assert ddp.keys() == one.keys()
    for k, v in one.items():
        torch.testing.assert_close(ddp[k], v, atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert not torch.equal(one["head.fc1.weight"], build_fake(RECIPE, registry=fake_registry,
                                                               dropout=0.0).adapter_tensors()["head.fc1.weight"])

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["losses"] == pytest.approx(result.losses, abs=1e-5)  # logged loss: mean over ranks
    assert ranks[0]["losses"] == ranks[1]["losses"]
    seen0, seen1 = ranks[0]["seen"], ranks[1]["seen"]
    assert len(seen0) == len(seen1) == STEPS * 4 and not set(seen0) & set(seen1)
    assert sorted(seen0 + seen1) == sorted(single.base_model.seen)  # the same global batches
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000004"]


def _resume_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import peftmed.plugins as plugins

    reg = plugins.build_registry(extra_plugins=[FakePlugin()], load_entrypoints=False)
    plugins.set_default_registry(reg)
    pm = build_fake(RECIPE, registry=reg, dropout=0.0)
    config = TrainConfig(steps=2 * STEPS, batch_size=4, lr=1e-3, adam_eps=1e-3, warmup_steps=1, progress=False,
                         seed=1, save_every=2)
    Trainer(pm, VQADataset(make_records(), 8), config, output_dir=out).train(resume=True)


@pytest.mark.slow
def test_a_one_process_run_resumes_under_two_processes(fake_registry, tmp_path):
    """Moving from 1 to 2 processes with the same global batch continues the same run."""
    def config(steps):
        return TrainConfig(steps=steps, batch_size=8, lr=1e-3, adam_eps=1e-3, warmup_steps=1, progress=False, seed=1,
                           save_every=2)

    whole = build_fake(RECIPE, registry=fake_registry, dropout=0.0)
    Trainer(whole, VQADataset(make_records(), 8), config(2 * STEPS), output_dir=tmp_path / "whole").train()

    out = tmp_path / "moved"
    first = build_fake(RECIPE, registry=fake_registry, dropout=0.0)
    first.base_model.signals_at_call = {STEPS: [signal.SIGTERM]}  # stopped after step 4 of 8, checkpointed
    with pytest.raises(TrainingInterrupted):
        Trainer(first, VQADataset(make_records(), 8), config(2 * STEPS), output_dir=out).train()
    mp.spawn(_resume_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)

    from safetensors.torch import load_file

    moved = load_file(str(out / "adapter" / "adapter.safetensors"))
    meta = json.loads((out / "checkpoints" / f"step-{2 * STEPS:08d}" / "trainer.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 2 * STEPS
    for k, v in whole.adapter_tensors().items():
        torch.testing.assert_close(moved[k], v.detach(), atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
