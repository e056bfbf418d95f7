"""--strategy fsdp (FSDP2 fully_shard, gloo on this CPU): a 2-process sharded run trains the adapter the
1-process run trains, and its checkpoints resume on another number of processes (and back)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from test_distributed_real import RECIPE, _free_port, _setup  # noqa: F401  (the real miss-tiny setting)

STEPS = 8


def _run(out: str, steps: int, *, strategy: str = "auto", resume: bool = False, save_every: int = 0) -> None:
    """A global batch of 8: one process with 8 samples, or 2 sharded processes with 4 each."""
    from peftmed.train import TrainConfig, Trainer

    pm, data = _setup()
    config = TrainConfig(steps=steps, batch_size=4 if strategy == "fsdp" else 8, lr=1e-3, adam_eps=1e-3, max_grad_norm=1.0, warmup_steps=0,
                         progress=False, seed=2, strategy=strategy, save_every=save_every, keep_checkpoints=3)
    Trainer(pm, data, config, output_dir=out).train(resume=resume)


def _worker(rank, world, port, out, steps, resume, save_every):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    _run(out, steps, strategy="fsdp", resume=resume, save_every=save_every)


def _sharded(out, steps, *, resume=False, save_every=0):
    mp.spawn(_worker, args=(2, _free_port(), str(out), steps, resume, save_every), nprocs=2, join=True)


def _adapter(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter" / "adapter.safetensors"))


def _assert_same(a, b, atol=2e-5):
    assert set(a) == set(b) and any("norm" in k or "LayerNorm" in k for k in a)  # LayerNorm-tuning is in it
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


@pytest.mark.slow
def test_a_sharded_run_trains_the_one_process_adapter_and_resumes_across_process_counts(tmp_path):
    one = tmp_path / "one"
    _run(str(one), STEPS, save_every=STEPS // 2)
    reference = _adapter(one)

    sharded = tmp_path / "sharded"
    _sharded(sharded, STEPS, save_every=STEPS // 2)
    _assert_same(_adapter(sharded), reference)
    ckpts = sorted(p.name for p in (sharded / "checkpoints").glob("step-*"))
    assert ckpts == [f"step-{STEPS // 2:08d}", f"step-{STEPS:08d}"]

    # 2 sharded processes -> 1 process: continue the half-way checkpoint of the sharded run
    (sharded / "checkpoints" / "latest").write_text(f"step-{STEPS // 2:08d}\n")
    _run(str(sharded), STEPS, resume=True)
    _assert_same(_adapter(sharded), reference)

    # 1 process -> 2 sharded processes: continue the half-way checkpoint of the one-process run
    (one / "checkpoints" / "latest").write_text(f"step-{STEPS // 2:08d}\n")
    _sharded(one, STEPS, resume=True)
    _assert_same(_adapter(one), reference)
