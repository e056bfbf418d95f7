"""The GPU check returns a table whatever happens: a dry run and a machine without a GPU list every step and every
target (each benchmark's --list-targets) as NOT MEASURED; a build that hangs is stopped at the global deadline and the table is still whole;
each benchmark target is on disk the moment it is measured; and nothing the check imports is missing on the GPU
machine (its package list is in ../shared/DESIGN.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "benchmarks" / "gpu_check.sh"
BENCHES = ("bench_lora_linear", "bench_layer_norm", "bench_prefix_attention")


def _run(tmp_path, *args, **env):
    full = {**os.environ, "PYTHON": sys.executable, **env}
    full.pop("TRITON_INTERPRET", None)
    start = time.monotonic()
    proc = subprocess.run(["bash", str(CHECK), *args, str(tmp_path / "out")], capture_output=True, text=True,
                          env=full, timeout=300)
    return proc, time.monotonic() - start, (tmp_path / "out" / "summary.txt").read_text()


def _listed(bench: str, *args: str) -> list[str]:
    """The targets ``bench`` records with the GPU check's arguments (its --list-targets)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernels" / f"{bench}.py"), "--list-targets",
                           "--device", "cuda", *args], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [t["target"] for t in json.loads(proc.stdout)]


def _assert_whole_table(summary: str, why: str):
    """Every target of every benchmark has its own line, NOT MEASURED with the reason."""
    lines = summary.splitlines()
    listed = (_listed("bench_lora_linear", "--no-compile") + _listed("bench_layer_norm")
              + _listed("bench_prefix_attention", "--skip-model"))
    assert len(listed) >= 40 and any("triton_persistent" in t for t in listed), listed
    for name in listed:
        line = next((ln for ln in lines if ln.startswith(name + " ")), None)
        assert line is not None, f"no line for the target {name!r}"
        assert "NOT MEASURED" in line and why in line, line
    assert f"{len(listed)} NOT MEASURED" in summary
    for name in ("build lora_linear_cuda", "build layer_norm_cuda", "build prefix_attention_cuda",
                 "tests: GPU targets, bf16", "tests: kernels", "bench_lora_breakdown", *BENCHES):
        assert name in summary, name


def test_a_dry_run_lists_every_step_and_target(tmp_path):
    proc, took, summary = _run(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    _assert_whole_table(summary, "dry run")
    assert took < 60


def test_without_a_gpu_the_check_ends_at_once_with_the_whole_table(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc, _, summary = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in summary
    _assert_whole_table(summary, "no CUDA device")


def test_a_hung_build_still_ends_with_the_whole_table_at_the_deadline(tmp_path):
    """Builds that never finish (a stand-in sleeps 120 s) are stopped at the global deadline (15 s here); every
    later step is reported not run, every benchmark NOT MEASURED, and the check fails."""
    proc, took, summary = _run(tmp_path, PEFTMED_GPU_CHECK_ASSUME_GPU="1", PEFTMED_GPU_CHECK_FAKE_BUILD_SECONDS="120",
                               PEFTMED_GPU_CHECK_DEADLINE="15")
    assert proc.returncode == 1
    assert took < 60, f"the check took {took:.0f} s past a 15 s deadline"
    assert summary.count("TIMED OUT") == 3
    _assert_whole_table(summary, "global deadline reached")


def test_each_target_is_on_disk_as_soon_as_it_is_measured(tmp_path):
    """A benchmark killed after its first target keeps it (targets used to be written only at the end)."""
    path = tmp_path / "targets.json"
    code = ("import os, sys, time; sys.path.insert(0, 'benchmarks/kernels'); from common import target, "
            "write_targets; target('LoRA a', 1.05, '<= 1.10x', True, 'x'); print('measured', flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PEFTMED_TARGETS_JSON": str(path)})
    assert "measured" in proc.stdout.readline() or "measured" in proc.stdout.readline()
    proc.kill()
    proc.wait()
    assert [r["target"] for r in json.loads(path.read_text())] == ["LoRA a"]
    # written at the end as well (the --targets-json path), the same file does not get it twice
    code = ("import sys; sys.path.insert(0, 'benchmarks/kernels'); from common import target, write_targets; "
            "from pathlib import Path; target('LoRA b', 1.0, '<= 1.10x', True); write_targets(Path(sys.argv[1]))")
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "PEFTMED_TARGETS_JSON": str(path)})
    assert [r["target"] for r in json.loads(path.read_text())] == ["LoRA a", "LoRA b"]


def test_a_benchmark_stopped_after_its_first_target_leaves_the_rest_not_measured(tmp_path):
    """The table from what a run left: LoRA's benchmark timed out after one target, so that one is shown measured and
    each other target it lists NOT MEASURED with the reason; a benchmark whose listing failed still has a line."""
    listed = [{"target": f"LoRA t{i}", "goal": "<= 1.10x"} for i in range(3)]
    (tmp_path / "expected-bench_lora_linear.json").write_text(json.dumps(listed))
    (tmp_path / "expected-bench_layer_norm.json").write_text(json.dumps([{"target": "LayerNorm n", "goal": "> 1x"}]))
    (tmp_path / "targets.json").write_text(json.dumps([{"target": "LoRA t0", "figure": "1.05x", "goal": "<= 1.10x",
                                                        "met": True}]))
    (tmp_path / "steps.tsv").write_text("bench_lora_linear\tTIMED OUT\tstopped after 90 s\n"
                                        "bench_layer_norm\tok\t120 s budget\n")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernels" / "gpu_summary.py"), str(tmp_path), "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = {ln.split("  ")[0]: ln for ln in proc.stdout.splitlines()}
    assert lines["LoRA t0"].endswith(" met")
    for name in ("LoRA t1", "LoRA t2"):
        assert "NOT MEASURED (bench_lora_linear TIMED OUT: stopped after 90 s)" in lines[name]
    assert "NOT MEASURED (bench_layer_norm ok" in lines["LayerNorm n"]  # it ran, and recorded nothing for it
    assert "NOT MEASURED (bench_prefix_attention not run)" in proc.stdout
    assert "1 of 1 measured targets met; 4 NOT MEASURED" in proc.stdout


# What the GPU machine has (../shared/DESIGN.md): the check and peftmed's import-time dependencies must be among them.
GPU_MACHINE = {"torch", "triton", "transformers", "tokenizers", "safetensors", "peft", "pluggy", "pytest", "hypothesis",
               "scipy", "statsmodels", "numpy", "pandas", "matplotlib", "pillow", "pyyaml", "tqdm", "tensorboard",
               "ninja", "pybind11", "setuptools", "accelerate", "timm", "torchvision", "onnx", "huggingface-hub",
               "filelock", "fsspec", "jinja2", "markupsafe", "networkx", "sympy", "mpmath", "typing-extensions",
               "packaging", "regex", "requests", "pyparsing", "certifi", "charset-normalizer", "idna", "urllib3",
               "psutil", "python-dateutil", "six", "iniconfig", "pluggy", "attrs", "sortedcontainers", "pytz",
               "tzdata", "cycler", "kiwisolver", "fonttools", "contourpy", "patsy", "hf-xet", "typer", "click",
               "shellingham", "rich", "markdown-it-py", "mdurl", "pygments", "annotated-doc", "httpx", "httpcore",
               "h11", "anyio", "sniffio", "nvidia-ml-py"}


def test_the_check_imports_nothing_the_gpu_machine_lacks():
    code = r"""
import importlib, importlib.metadata as md, sys
sys.path.insert(0, 'benchmarks/kernels'); sys.path.insert(0, 'tests/kernels')
import peftmed, peftmed.cli, peftmed.kernels, peftmed.kernels.build
from peftmed.kernels.lora_linear import op, triton_impl
from peftmed.kernels.layer_norm import op as ln_op
from peftmed.kernels.prefix_attention import op as pa_op
import common, bench_lora_linear, bench_layer_norm, bench_prefix_attention, kernels_testlib
dists = md.packages_distributions()
used = set()
for name in list(sys.modules):
    top = name.split('.')[0]
    if top in sys.stdlib_module_names or top.startswith('_') or top in ('peftmed', 'common', 'kernels_testlib') \
            or top.startswith('bench_'):
        continue
    used.update(d.lower().replace('_', '-') for d in dists.get(top, [top]))
print('\n'.join(sorted(used)))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    used = set(proc.stdout.split())
    missing = sorted(d for d in used if d not in GPU_MACHINE and not d.startswith(("nvidia-", "triton")))
    assert not missing, f"imported by the GPU check but not on the GPU machine: {missing}"


def test_the_lora_breakdown_runs_its_code_paths_on_the_cpu():
    """The per-kernel breakdown the GPU check runs (each LoRA kernel beside cuBLAS or a copy, then a tile sweep)
    goes through the same code on a CPU under the interpreter at a tiny shape: every row and every tile printed."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernels" / "bench_lora_breakdown.py"),
                           "--device", "cpu", "--tokens", "32", "--features", "64", "--rank", "4", "--rounds", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kernel in ("_down_kernel", "_gemm_lora_kernel fwd", "_gs_db_kernel", "_reduce_kernel", "_gemm_lora_kernel dx",
                   "_wgrad_kernel"):
        assert any(line.startswith(kernel) for line in proc.stdout.splitlines()), kernel
    sweep = proc.stdout.split("tile sweep")[1].splitlines()[1:]
    assert len([line for line in sweep if "x cuBLAS" in line]) == 7, proc.stdout
