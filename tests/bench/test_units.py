"""Suites, the peft provider, the memory probe and reproducibility, without a whole suite."""

import json

import pytest
import torch

import peftmed
from peftmed.baselines import PeftUnavailable, apply_peft, peft_equivalent
from peftmed.bench.suites import BUILTIN_SUITES, check_suite, read_suite_file
from peftmed.bench.worker import Job, run_job
from peftmed.errors import ConfigError
from peftmed.recipe import Recipe


@pytest.mark.parametrize("name", sorted(BUILTIN_SUITES))
def test_builtin_suites_check_on_miss(registry, name):
    bb = registry.backbone("miss-tiny")
    entries = check_suite(BUILTIN_SUITES[name], bb, registry)
    assert len(entries) == len(BUILTIN_SUITES[name])


def test_mile_rows_mean_what_the_paper_says(registry):
    bb = registry.backbone("miss-tiny")
    recipe = Recipe.parse("T|T|LoRA", list(bb.components)).canonical(registry)
    assert {c: [m.name for m in ms] for c, ms in recipe.trained(bb.components, registry).items()} == {
        "vision": ["full"], "fusion": ["full"], "decoder": ["lora"]}


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "recipes:\n  - '*=layernorm'\n  - {recipe: 'F|LoRA|LoRA', label: lora}\n"),
    (".toml", "recipes = ['*=layernorm', {recipe = 'F|LoRA|LoRA', label = 'lora'}]\n"),
    (".json", json.dumps({"recipes": ["*=layernorm", {"recipe": "F|LoRA|LoRA", "label": "lora"}]})),
])
def test_suite_files(tmp_path, suffix, text):
    path = tmp_path / f"suite{suffix}"
    path.write_text(text)
    entries = read_suite_file(path)
    assert [(e.recipe, e.name) for e in entries] == [("*=layernorm", "*=layernorm"), ("F|LoRA|LoRA", "lora")]


def test_bad_suite_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_suite_file(tmp_path / "nope.yaml")
    bad = tmp_path / "s.yaml"
    bad.write_text("recipes: []\n")
    with pytest.raises(ConfigError, match="non-empty list 'recipes'"):
        read_suite_file(bad)
    bad.write_text("recipes:\n  - {recipe: '*=ffn', lable: x}\n")
    with pytest.raises(ConfigError, match="unknown keys \\['lable'\\]"):
        read_suite_file(bad)


def test_peft_targets_the_same_modules(registry):
    bb = registry.backbone("miss-tiny")
    for text in ("fusion=lora(r=4,alpha=8) decoder=lora(r=4,alpha=8)", "*=ia3", "*=layernorm", "T|T|LoRA"):
        torch.manual_seed(0)
        ours = peftmed.apply(bb.build(), text, backbone=bb, registry=registry, keep_base=False).num_trainable()
        theirs = apply_peft(bb.build(), text, bb, registry)
        assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == ours, text


def test_peft_equivalents(registry):
    bb = registry.backbone("miss-tiny")
    reason = lambda t: peft_equivalent(Recipe.parse(t, list(bb.components)), bb, registry)  # noqa: E731
    assert reason("*=lora") is None and reason("T|T|LoRA") is None
    assert "no 'ffn'" in reason("*=ffn")
    assert "one method per model" in reason("fusion=lora decoder=ia3")
    with pytest.raises(PeftUnavailable, match="no 'bitfit'"):
        apply_peft(bb.build(), "*=bitfit", bb, registry)


def test_memory_probe_sees_an_allocation():
    """In a fresh process, as the bench runs each recipe (a long-lived process may hand a new block memory it
    already holds, which no resident-set measure can see)."""
    import subprocess
    import sys

    code = ("import torch\nfrom peftmed.bench.memory import MemoryProbe\n"
            "probe = MemoryProbe(torch.device('cpu'))\nprobe.start()\n"
            "block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched\n"
            "print(probe.peak_mib())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 60 <= float(proc.stdout.split()[-1]) < 200


def test_same_seed_same_results(registry):
    from peftmed.bench import task

    job = Job(label="lora", recipe="F|LoRA|LoRA", provider="peftmed", backbone="miss-tiny", dataset="phantom",
              train_options={"n_images": 4}, test_options={"n_images": 4}, steps=3, batch_size=4, eval_samples=8,
              eval_batch_size=8, max_new_tokens=3, device="cpu", threads=1, progress=False)
    train, _ = task.load_data(job, registry)
    job.shared_options = task.shared_build_options(registry.get("task", "vqa"), registry.backbone("miss-tiny"), {},
                                                   train)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    a, b = run_job(job), run_job(job)
    # a job run in this process leaves its settings behind it (threads, deterministic algorithms: a later caller's
    # kernels would be chosen under them)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)
    assert a["status"] == b["status"] == "ok"
    assert a["final_loss"] == b["final_loss"] and a["predictions"] == b["predictions"]
    assert a["acc_overall"] == b["acc_overall"]
    job.seed = 1
    c = run_job(job)
    assert c["final_loss"] != a["final_loss"]


def test_extensions_are_built_before_any_timing_and_the_report_says_so(tmp_path, monkeypatch):
    """A cold C++ build (about 40 s) used to land in the first LoRA row's timed budget."""
    from peftmed.bench import runner
    from peftmed.kernels import build

    built = []
    monkeypatch.setattr(build, "cache_root", lambda: tmp_path)  # an empty cache: every extension is fresh
    monkeypatch.setattr(build, "can_compile", lambda cuda=False: (not cuda, ""))
    monkeypatch.setattr(build, "load_extension", lambda name: built.append(name))
    lines = []
    done = runner.prebuild_kernels("cpu", lines.append)
    assert built == ["lora_linear_cpu", "layer_norm_cpu"]  # the CPU ones; CUDA ones only on a GPU
    assert all(d["built"] for d in done) and any("before any timing" in line for line in lines)


def test_result_files_of_different_labels_never_collide(tmp_path):
    """Labels become file names: `x/y` and `x_y`, or two long labels that share their first 80 characters,
    used to map to one file, so one recipe overwrote the other's runs/ and predictions/ files."""
    from peftmed.bench import results

    long = "fusion=lora(r=8,alpha=16,dropout=0.05,roles=[attn.q,attn.k,attn.v,attn.o,cross.q,cross.k]) "
    labels = ["x/y", "x_y", "x y", long + "decoder=lora(r=4)", long + "decoder=lora(r=8)", "*=lora", "all=lora"]
    for i, label in enumerate(labels):
        results.save_job(tmp_path, {"label": label, "provider": "peftmed", "score": i, "predictions": {"q": label}},
                         {"fp": 1})
    for i, label in enumerate(labels):
        assert results.load_job(tmp_path, label, "peftmed", {"fp": 1})["score"] == i
        assert results.load_predictions(tmp_path, label, "peftmed") == {"q": label}
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(names) == len(labels) and all(len(n) < 100 for n in names)
