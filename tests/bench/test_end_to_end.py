"""A two-recipe miniature suite end to end, each job in its own worker process, with peft beside."""

import csv
import json
import math

import pytest

from peftmed.bench import read_results, results, run_bench
from peftmed.bench.results import METRICS

FIGURES = ("trainable", "trainable_percent", "peak_memory_mib", "throughput", "step_time_median_s", "train_time_s",
           "acc_closed", "acc_open", "acc_overall")


@pytest.fixture(scope="module")
def suite(tmp_path_factory, mini):
    out = tmp_path_factory.mktemp("bench") / "run"
    lines = []
    data = run_bench(mini(out, isolate=True), echo=lines.append)
    return out, data, "\n".join(lines)


def test_every_figure_present_and_finite(suite):
    out, data, _ = suite
    rows = {(r["label"], r["provider"]): r for r in data["rows"]}
    # both recipes have a peft equivalent (LNTuning, LoRA), so each runs through both providers
    assert set(rows) == {("*=layernorm", "peftmed"), ("*=layernorm", "peft"),
                         ("F|LoRA|LoRA", "peftmed"), ("F|LoRA|LoRA", "peft")}
    for key, row in rows.items():
        assert row["status"] == "ok", (key, row.get("error"))
        for name in FIGURES:
            assert isinstance(row[name], (int, float)) and math.isfinite(row[name]), (key, name, row[name])
        assert row["steps_done"] == 2 and row["n_test"] == 8
        assert row["peak_memory_mib"] > 0 and row["throughput"] > 0
        assert 0 <= row["acc_overall"] <= 1
        assert "fresh process" in row["memory_method"]
    # the same recipe trains the same number of parameters in both libraries
    for label in ("*=layernorm", "F|LoRA|LoRA"):
        assert rows[(label, "peftmed")]["trainable"] == rows[(label, "peft")]["trainable"] > 0
    assert rows[("F|LoRA|LoRA", "peftmed")]["row"] == "F|LoRA|LoRA"


def test_result_files_schema(suite):
    out, data, _ = suite
    doc = json.loads((out / "results.json").read_text())
    assert doc["format"] == "peftmed-bench" and doc["format_version"] == 2
    meta = doc["meta"]
    for key in ("peftmed", "plugins", "torch", "transformers", "peft", "device", "device_name", "git_sha", "seed"):
        assert key in meta, key
    assert meta["peft"] and meta["torch"] and meta["seed"] == 0 and meta["device"] == "cpu"
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["recipe", "provider", "seed", "metric", "value"]
    tidy = {(r["recipe"], r["provider"], r["seed"], r["metric"]): r["value"] for r in table}
    for label in ("*=layernorm", "F|LoRA|LoRA"):
        for provider in ("peftmed", "peft"):
            assert tidy[(label, provider, "0", "status")] == "ok"
            for metric in METRICS:
                assert math.isfinite(float(tidy[(label, provider, "0", metric)])), (label, provider, metric)
            # the summary over seeds: the interval of the primary score brackets it
            low, high = (float(tidy[(label, provider, "all", k)]) for k in ("ci_low", "ci_high"))
            assert low <= float(tidy[(label, provider, "all", "acc_overall")]) <= high
    assert read_results(out)["rows"] == data["rows"]
    summary = {(r["label"], r["provider"]): r for r in data["summary"]}
    assert set(summary) == {(r["label"], r["provider"]) for r in data["rows"]}


def test_plots_report_and_table(suite):
    out, _, printed = suite
    for name in ("accuracy_vs_trainable.png", "throughput.png", "memory.png"):
        png = out / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    report = (out / "report.md").read_text()
    for name in ("accuracy_vs_trainable.png", "throughput.png", "memory.png"):
        assert f"(plots/{name})" in report
    assert "F\\|LoRA\\|LoRA" in report and "peft" in report
    assert "95% CI" in report and "p vs frozen" in report
    # the live table printed a line per recipe with the peft ratios filled in
    line = next(l for l in printed.splitlines() if l.startswith("F|LoRA|LoRA"))
    ratios = line.split()[-3:]
    assert all(math.isfinite(float(x)) for x in ratios), line
    predictions = json.loads(results.predictions_file(out, "F|LoRA|LoRA", "peftmed", 0).read_text())
    assert len(predictions) == 8


def test_seeds_repeat_each_training_recipe(tmp_path, mini):
    out = tmp_path / "seeds"
    data = run_bench(mini(out, peft=False, recipes=["frozen", "*=layernorm"], seeds=(0, 1)), echo=lambda _: None)
    runs = sorted((r["label"], r["seed"]) for r in data["rows"])
    assert runs == [("*=layernorm", 0), ("*=layernorm", 1), ("frozen", 0)]  # frozen trains nothing: one run
    summary = {r["label"]: r for r in data["summary"]}
    assert summary["*=layernorm"]["n_seeds"] == 2 and summary["*=layernorm"]["seed_sd"] is not None
    assert summary["*=layernorm"]["p_vs_frozen"] is not None
    assert results.predictions_file(out, "*=layernorm", "peftmed", 1).is_file()
