"""Bad input: errors before any training (naming what exists); per-row failures keep the suite going."""

import pytest
import torch

import peftmed.bench.runner as runner
import peftmed.bench.worker as worker
from peftmed.bench import run_bench
from peftmed.cli import main
from peftmed.errors import PeftmedError


@pytest.fixture
def no_training(monkeypatch):
    def fail(job):
        raise AssertionError("a job started although the input was bad")

    monkeypatch.setattr(runner, "run_job", fail)


@pytest.mark.parametrize("overrides, message", [
    ({"backbone": "miss-tinny"}, "unknown backbone 'miss-tinny'; did you mean 'miss-tiny'"),
    ({"dataset": "phantome"}, "Known datasets: .*phantom"),
    ({"recipes": ["*=lorra"]}, "unknown method 'lorra'.*Known methods:.*lora"),
    ({"recipes": ["fusion=lora(rank=4)"]}, "unknown option 'rank' for method 'lora'.*Known options: alpha"),
    ({"recipes": ["retina=lora"]}, "unknown component 'retina'.*decoder, fusion, vision"),
    ({"recipes": ["*=lora("]}, "suite recipe"),
    ({"suite": "mlie", "recipes": []}, "unknown suite 'mlie'; did you mean 'mile'"),
    ({"steps": 0}, "steps must be a positive integer, got 0"),
])
def test_errors_before_training(tmp_path, mini, no_training, overrides, message):
    with pytest.raises(PeftmedError, match=message):
        run_bench(mini(tmp_path / "out", **overrides), echo=lambda _: None)
    assert not (tmp_path / "out" / "results.json").exists()


def test_cli_reports_bad_input(tmp_path, no_training, capsys):
    assert main(["bench", "--recipes", "*=lorra", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'lorra'" in err and "lora" in err


def test_row_failures_do_not_stop_the_suite(tmp_path, mini, monkeypatch):
    real = worker._train

    def oom_for_bitfit(job, *args):
        if job.label == "*=bitfit":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(job, *args)

    monkeypatch.setattr(worker, "_train", oom_for_bitfit)
    # vision has no cross-attention: a recipe this backbone cannot take
    recipes = ["vision=lora(roles=[cross.q])", "*=bitfit", "*=layernorm"]
    data = run_bench(mini(tmp_path / "out", recipes=recipes, peft=False), echo=lambda _: None)
    rows = {r["label"]: r for r in data["rows"]}
    assert rows["vision=lora(roles=[cross.q])"]["status"] == "failed"
    assert "matches no module" in rows["vision=lora(roles=[cross.q])"]["error"]
    assert rows["*=bitfit"]["status"] == "oom" and "out of memory" in rows["*=bitfit"]["error"]
    assert rows["*=layernorm"]["status"] == "ok"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "OOM" in report and "FAILED" in report


def test_peft_error_is_recorded_in_its_row(tmp_path, mini):
    """peft's prompt learning needs a transformers LM; on MISS the row keeps peft's own error."""
    data = run_bench(mini(tmp_path / "out", recipes=["fusion=prefix decoder=prefix"]), echo=lambda _: None)
    rows = {r["provider"]: r for r in data["rows"]}
    assert rows["peftmed"]["status"] == "ok"
    assert rows["peft"]["status"] == "failed" and rows["peft"]["error"]
