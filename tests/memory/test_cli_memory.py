"""The memory options from the command line: a QLoRA run with checkpointing in bf16, and bad values named
before anything is built."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("bitsandbytes")
BASE = ["train", "--dataset", "phantom", "--data-options", "n_images=12", "--steps", "3", "--batch-size", "4",
        "--progress", "false", "--eval-batch-size", "24"]


def _run(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "peftmed", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def test_a_qlora_run_with_checkpointing_and_per_component_rates(tmp_path):
    out = tmp_path / "run"
    r = _run(*BASE, "--backbone", "hf-llava", "--recipe", "vision=lora(r=4,lr=2e-5) llm=lora(r=8)", "--lr", "1e-3",
             "--base-dtype", "bf16", "--grad-checkpoint", "vision,llm", "--quantize", "nf4", "--output", str(out),
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "NF4 base: 14 linear layers" in r.stderr and "checkpointed layers: vision 2, llm 2" in r.stderr
    lines = {line.split()[0]: line.split() for line in r.stderr.splitlines() if line.startswith(("vision ", "llm "))}
    assert lines["vision"][-2:] == ["2e-05", "0.01"] and lines["llm"][-2:] == ["0.001", "0.01"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["memory"]["quantized"]["layers"] == 14
    assert [row["lr"] for row in json.loads((out / "metrics.json").read_text())["trainable"]["rows"]] == [2e-5, None]
    ev = _run("eval", "--adapter", str(out / "adapter"), "--quantize", "none", "--base-dtype", "bf16",
              "--progress", "false", "--batch-size", "24", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr


@pytest.mark.parametrize("args,message", [
    (["--backbone", "hf-llava", "--recipe", "llm=lora", "--grad-checkpoint", "visoin"], "unknown component 'visoin'"),
    (["--backbone", "miss-tiny", "--recipe", "decoder=lora", "--quantize", "nf4"], "no 'llm' component"),
    (["--backbone", "hf-llava", "--recipe", "llm=lora", "--quantize-components", "llm"], "needs --quantize nf4"),
    (["--backbone", "hf-llava", "--recipe", "llm=lora(lr=0)", "--quantize", "nf4"], "lr must be a positive number"),
    (["--backbone", "hf-llava", "--recipe", "llm=lora", "--base-dtype", "bf8"], "invalid choice: 'bf8'"),
])
def test_bad_memory_options_are_named_before_anything_is_built(tmp_path, args, message):
    r = _run(*BASE, *args, "--output", str(tmp_path / "x"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()
