"""SIGINT (Ctrl-C) and SIGTERM (what schedulers send) stop training at the next step boundary with a
checkpoint written and a message saying how to resume; the resumed run computes the same losses as one
never interrupted; a second signal aborts at once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_fakes import build_fake, make_records

from peftmed.data import VQADataset
from peftmed.train import TrainConfig, Trainer, latest_checkpoint
from peftmed.train.trainer import TrainingInterrupted

BASE = dict(batch_size=8, lr=1e-2, progress=False, seed=3, warmup_steps=2, steps=12)


def run(pm, out, resume=False, **cfg):
    return Trainer(pm, VQADataset(make_records(), 8), TrainConfig(**{**BASE, **cfg}), output_dir=out).train(resume)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_checkpoints_at_the_step_boundary_and_resume_equals_an_uninterrupted_run(
        fake_registry, tmp_path, signum, code, capfd):
    full = run(build_fake(registry=fake_registry), tmp_path / "full")
    before = signal.getsignal(signal.SIGINT)  # the default, or SIG_IGN in a job started in the background

    pm = build_fake(registry=fake_registry)
    pm.base_model.signals_at_call = {5: [signum]}  # arrives inside step 5
    with pytest.raises(TrainingInterrupted) as err:
        run(pm, tmp_path / "cut")
    assert err.value.exit_code == code and err.value.step == 5
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step-00000005"
    assert f"interrupted by {signal.Signals(signum).name} after step 5" in str(err.value)
    assert "--resume" in str(err.value)
    assert "stopping after the current step" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored

    resumed = run(build_fake(registry=fake_registry), tmp_path / "cut", resume=True)
    assert resumed.losses == full.losses


def test_a_second_signal_aborts_at_once(fake_registry, tmp_path):
    pm = build_fake(registry=fake_registry)
    pm.base_model.signals_at_call = {3: [signal.SIGINT, signal.SIGINT]}
    with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
        run(pm, tmp_path, save_every=2)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000002"  # nothing of step 3


def _train_cli(out, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "peftmed", "-v", "train", "--backbone", "miss-tiny",
           "--recipe", "fusion=lora(r=4,kernel=torch) decoder=layernorm", "--dataset", "phantom",
           "--data-options", "n_images=8", "--batch-size", "4", "--lr", "1e-3", "--steps", "30",
           "--log-every", "1", "--progress", "false", "--evaluate", "false", "--output", str(out), *extra]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_the_cli_saves_on_a_signal_and_resumes_to_the_same_losses(tmp_path, signum, code):
    proc = _train_cli(tmp_path / "full")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())["train"]["losses"]

    proc = _train_cli(tmp_path / "cut")
    err = []
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        err.append(line)
        if "step 3 " in line:
            proc.send_signal(signum)
            break
        assert time.monotonic() < deadline, "".join(err)
    rest = proc.stderr.read()
    assert proc.wait(timeout=300) == code, "".join(err) + rest
    assert f"interrupted by {signal.Signals(signum).name} after step" in rest
    assert "resume: " in rest and "--resume" in rest and "Traceback" not in rest
    saved = latest_checkpoint(tmp_path / "cut" / "checkpoints")
    assert saved is not None and 3 <= int(saved.name.split("-")[1]) < 30

    proc = _train_cli(tmp_path / "cut", "--resume")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())["train"]["losses"]
    assert resumed == full


def test_sigterm_outside_training_is_reported_not_silent(tmp_path):
    """SIGTERM while the command is still preparing (before the loop) ends it with a message and 143."""
    code = ("import os, signal, sys\n"
            "import peftmed.cli as cli\n"
            "from peftmed.cli import Command\n"
            "def run(args):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return 0\n"
            "import peftmed.plugins as plugins\n"
            "registry = plugins.build_registry()\n"
            "registry._entries['command']['sleepy'] = Command('sleepy', 'test', lambda p: None, run)\n"
            "plugins.set_default_registry(registry)\n"
            "sys.exit(cli.main(['sleepy']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143
    assert "peftmed sleepy: terminated (SIGTERM)" in proc.stderr


def test_interrupted_training_saves_no_final_adapter(fake_registry, tmp_path):
    pm = build_fake(registry=fake_registry)
    pm.base_model.signals_at_call = {2: [signal.SIGINT]}
    with pytest.raises(TrainingInterrupted):
        run(pm, tmp_path)
    assert not (tmp_path / "adapter").exists()  # only the checkpoint: the run is not finished
    assert torch.load(latest_checkpoint(tmp_path / "checkpoints") / "trainer_state.pt", weights_only=True)
