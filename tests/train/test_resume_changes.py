"""Resuming with other settings than the checkpoint's: a new global batch, a smaller dataset, another
number of processes. The run continues from the same sample of the same epoch (or the next epoch when
less than one batch is left), and never loops: every test runs under an alarm that fails it instead
of hanging (the old trainer rebuilt its data loader forever when the saved position was past the new
epoch's end)."""

import signal

import pytest
import torch
from train_fakes import build_fake, make_records

from peftmed.data import VQADataset
from peftmed.train import TrainConfig, Trainer

BASE = dict(lr=1e-2, progress=False, seed=3, warmup_steps=0)


@pytest.fixture(autouse=True)
def no_hang():
    def fail(signum, frame):
        raise AssertionError("the trainer did not finish within 60 s (resume loops forever?)")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def order(epoch, n, seed=BASE["seed"]):
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def train(registry, records, out, resume=False, **cfg):
    pm = build_fake(registry=registry, dropout=0.0)
    trainer = Trainer(pm, VQADataset(records, 8), TrainConfig(**{**BASE, **cfg}), output_dir=out)
    return pm, trainer.train(resume=resume)


def test_a_larger_batch_continues_from_the_same_sample(fake_registry, tmp_path, caplog):
    records = make_records(48)
    # 10 steps of 4: 40 of epoch 0's 48 samples trained on
    train(fake_registry, records, tmp_path, steps=10, batch_size=4, save_every=2)
    pm, result = train(fake_registry, records, tmp_path, resume=True, steps=13, batch_size=8)
    assert result.step == 13 and len(result.losses) == 13
    first = order(0, 48)[40:48]  # the rest of epoch 0 exactly fills one batch of 8
    second = order(1, 48)[:16]
    assert pm.base_model.seen == [f"q{i}" for i in first + second]
    assert "global_batch 4 -> 8" in caplog.text and "continuing epoch 0 at sample 40 of 48" in caplog.text


def test_less_than_one_new_batch_left_starts_the_next_epoch(fake_registry, tmp_path, caplog):
    records = make_records(48)
    train(fake_registry, records, tmp_path, steps=11, batch_size=4, save_every=11)  # 44 of 48
    pm, result = train(fake_registry, records, tmp_path, resume=True, steps=13, batch_size=8)
    assert result.step == 13
    assert pm.base_model.seen == [f"q{i}" for i in order(1, 48)[:16]]
    assert "continuing with epoch 1" in caplog.text


def test_a_smaller_dataset_continues_and_says_the_order_differs(fake_registry, tmp_path, caplog):
    train(fake_registry, make_records(48), tmp_path, steps=10, batch_size=4, save_every=5)
    small = make_records(24)
    pm, result = train(fake_registry, small, tmp_path, resume=True, steps=14, batch_size=4)
    assert result.step == 14 and len(pm.base_model.seen) == 16
    assert pm.base_model.seen == [f"q{i}" for i in order(1, 24)[:16]]
    assert "dataset_size 48 -> 24" in caplog.text and "data order differs" in caplog.text


def test_stale_temporaries_of_an_interrupted_write_are_removed_at_the_next_start(fake_registry, tmp_path):
    train(fake_registry, make_records(48), tmp_path, steps=2, batch_size=8)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-00000004.abc").mkdir()
    (root / ".tmp-step-00000004.abc" / "trainer_state.pt").write_bytes(b"half")
    (root / ".latest.x1y2.tmp").write_text("step-00000004\n")
    (root / "notes.txt").write_text("mine")  # a user's file is never touched
    train(fake_registry, make_records(48), tmp_path, resume=True, steps=3, batch_size=8)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "notes.txt", "step-00000003"]
