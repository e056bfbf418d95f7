"""--report-to tensorboard: the curves and hyperparameters a run sends, read back from the event files
TensorBoard writes (through torch's SummaryWriter); the bench logs each recipe as its own run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("tensorboard")


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _run(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "peftmed", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


def test_a_training_run_reports_its_curves_evaluations_and_hyperparameters(tmp_path):
    r = _run("train", "--backbone", "miss-tiny", "--recipe", "vision=layernorm decoder=lora(r=4,lr=2e-3)", "--dataset",
             "phantom", "--data-options", "n_images=12", "--steps", "6", "--batch-size", "4", "--eval-every", "3",
             "--eval-samples", "8", "--progress", "false", "--report-to", "tensorboard", "--run-name", "ln-lora",
             "--output", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    acc = _events(tmp_path / "run" / "logs" / "tensorboard" / "ln-lora")
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm", "train/samples_per_s", "memory/peak_mib",
            "train/lr/vision.layernorm", "train/lr/decoder.lora", "eval/acc_overall"} <= tags
    assert not any("group" in t for t in tags)  # learning rates are named by component and method
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert losses == pytest.approx(metrics["train"]["losses"], rel=1e-6)
    lora, ln = (acc.Scalars(f"train/lr/{name}")[2].value for name in ("decoder.lora", "vision.layernorm"))
    assert lora / ln == pytest.approx(2e-3 / 1e-4)  # the decoder's lr= beside the run's --lr, same schedule
    evals = acc.Scalars("eval/acc_overall")
    assert [e.step for e in evals] == [3, 6]  # during training, then the final evaluation on the whole test split
    assert evals[-1].value == pytest.approx(metrics["scores"]["acc_overall"], abs=1e-6)
    assert all(e.value > 0 for e in acc.Scalars("train/samples_per_s"))
    texts = set(acc.Tags()["tensors"])
    assert {"trainable/text_summary", "recipe/text_summary"} <= texts
    recipe = acc.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "decoder=lora(r=4,lr=0.002)" in recipe


def test_the_bench_logs_each_recipe_as_its_own_run(tmp_path):
    r = _run("bench", "--recipes", "*=layernorm", "*=lora(r=4)", "--steps", "2", "--eval-samples", "4", "--no-peft",
             "--no-progress", "--no-transfer", "--dataset-option", "n_images=8", "--batch-size", "4",
             "--report-to", "tensorboard", "--output", "bench", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    runs = sorted(p.name for p in (tmp_path / "bench" / "logs" / "tensorboard").iterdir())
    from peftmed.bench.suites import slug

    # the frozen row trains nothing
    assert runs == sorted(f"{slug(label)}.peftmed.s0" for label in ("*=layernorm", "*=lora(r=4)"))
    for name in runs:
        assert len(_events(tmp_path / "bench" / "logs" / "tensorboard" / name).Scalars("train/loss")) == 2


@pytest.mark.parametrize("value,message", [("tensorbored", "unknown target 'tensorbored'"),
                                           ("tensorboard,nope", "unknown target 'nope'")])
def test_unknown_targets_are_named(tmp_path, value, message):
    r = _run("train", "--backbone", "miss-tiny", "--recipe", "*=lora", "--dataset", "phantom", "--steps", "1",
             "--report-to", value, "--output", "run", cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_wandb_and_mlflow_offline_when_installed(tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    r = _run("train", "--backbone", "miss-tiny", "--recipe", "decoder=lora(r=4)", "--dataset", "phantom", "--data-options",
             "n_images=8", "--steps", "3", "--batch-size", "4", "--evaluate", "false", "--progress", "false",
             "--report-to", "wandb,mlflow", "--output", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert list((tmp_path / "run" / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "run" / "logs" / "mlruns").as_uri())
    run = client.search_runs([client.get_experiment_by_name("peftmed").experiment_id])[0]
    assert run.info.run_name == "run" and run.data.params["recipe"] == "decoder=lora(r=4)"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert losses == pytest.approx(metrics["train"]["losses"], rel=1e-6)
