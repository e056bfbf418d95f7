"""``peftmed bench --suite irg``: the bench's runner on the report task (its rows carry the report scores,
its table the report columns), and bad input."""

import json

import pytest

from peftmed.bench import results
from peftmed.bench.runner import BenchConfig, run_bench
from peftmed.bench.suites import BUILTIN_SUITES, SUITE_TASKS
from peftmed.errors import ConfigError


def test_irg_suite_is_the_layernorm_papers_comparison():
    assert SUITE_TASKS["irg"] == "report"
    assert [e.label for e in BUILTIN_SUITES["irg"]] == ["frozen", "full", "layernorm", "ffn", "attention", "lora",
                                                         "prefix"]


def test_report_bench_rows_carry_report_scores(tmp_path, registry):
    lines = []
    config = BenchConfig(suite="irg", recipes=["frozen", "*=layernorm"], dataset="phantom-report", steps=3,
                         batch_size=4, eval_samples=3, eval_batch_size=3, max_new_tokens=6, peft=False,
                         isolate=False, progress=False, output=str(tmp_path / "out"),
                         dataset_options={"n_images": 8})
    data = run_bench(config, registry, echo=lines.append)
    rows = {r["label"]: r for r in data["rows"]}
    rows["layernorm"] = rows.pop("*=layernorm")
    assert rows["layernorm"]["status"] == "ok", rows["layernorm"].get("error")
    assert rows["layernorm"]["steps_done"] == 3 and rows["layernorm"]["trainable"] > 0
    for key in ("bleu_4", "rouge_l", "cider", "meteor", "findings_f1"):
        assert 0.0 <= rows["layernorm"][key] <= 10.0
    assert config.task == "report"
    assert config.backbone_options["max_position_embeddings"] == 128  # miss-tiny holds a whole report
    preds = json.loads(results.predictions_file(tmp_path / "out", "*=layernorm", "peftmed", 0).read_text())
    assert len(preds) == 3
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| \\*=layernorm | " in md and "| BLEU-4 |" in md and "| frozen | `F\\|F\\|F` | 0 | 0.000 |" in md
    assert any("BLEU-4" in line and "find F1" in line for line in lines)


def test_report_bench_refuses_a_vqa_dataset(tmp_path, registry):
    config = BenchConfig(suite="irg", dataset="phantom", output=str(tmp_path / "x"), isolate=False)
    with pytest.raises(ConfigError, match="needs a report dataset"):
        run_bench(config, registry)
