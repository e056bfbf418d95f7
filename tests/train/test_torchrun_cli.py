"""`torchrun -m peftmed train` as a user runs it: two processes on this CPU (gloo over loopback). Rank 0 decides
about the output folder and the others follow; every rank used to check the folder itself, and rank 1 found
rank 0's train_config.json there and stopped with "output folder ... is not empty"."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

TRAIN = ["--backbone", "miss-tiny", "--recipe", "fusion=lora(r=4,kernel=torch) decoder=layernorm", "--dataset",
         "phantom", "--data-options", "n_images=4", "--batch-size", "2", "--lr", "1e-3", "--steps", "2",
         "--max-new-tokens", "3", "--progress", "false", "--device", "cpu"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, cwd, late_rank_1: bool = False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if late_rank_1:
        # rank 1 starts 15 s after rank 0 (as on a busy machine), so rank 0 has written the run folder by the time
        # rank 1 would look at it: a sitecustomize module sleeps in rank 1 before anything else runs
        hook = cwd / "late"
        hook.mkdir(exist_ok=True)
        (hook / "sitecustomize.py").write_text("import os, time\nif os.environ.get('RANK') == '1':\n    time.sleep(15)\n")
        env["PYTHONPATH"] = os.pathsep.join([str(hook), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(_port()), "-m", "peftmed", "train",
                           *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_into_a_new_output(tmp_path, strategy):
    r = torchrun(*TRAIN, "--strategy", strategy, "--output", "new", cwd=tmp_path, late_rank_1=True)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "is not empty" not in r.stderr
    metrics = json.loads((tmp_path / "new" / "metrics.json").read_text())
    assert metrics["train"]["step"] == 2
    assert (tmp_path / "new" / "adapter" / "adapter.safetensors").is_file()


@pytest.mark.slow
def test_every_rank_follows_rank_0s_refusal(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    r = torchrun(*TRAIN, "--output", "busy", cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.count("output folder 'busy' is not empty") == 2, r.stderr[-4000:]  # both ranks say why
    assert not re.search(r'File ".*peftmed', r.stderr), r.stderr[-4000:]  # (torchrun prints its own traceback)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]
