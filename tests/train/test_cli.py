"""``peftmed train`` / ``peftmed eval``: config files and flags, boolean flags, early errors, and an
end-to-end run of miss-tiny on the phantom dataset (train, resume, eval reproduces the predictions)."""

import json

import pytest

import peftmed
from peftmed.cli import build_parser, main
from peftmed.train.commands import resolve_options as resolve_with_given


def resolve_options(args):
    return resolve_with_given(args)[0]


def parse(registry, *argv):
    return build_parser(registry).parse_args(["train", *argv])


def test_flags_override_the_config_file_and_booleans_parse(registry, tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("backbone: miss-tiny\nrecipe: '*=layernorm'\ndataset: phantom\n"
                   "train:\n  lr: 0.001\n  batch-size: 4\n  progress: false\n"
                   "data_options: {domain: mr, n_images: 8}\n")
    opts = resolve_options(parse(registry, "--config", str(cfg), "--lr", "0.01", "--data-options", "n_images=4"))
    assert opts["lr"] == 0.01 and opts["batch_size"] == 4 and opts["progress"] is False
    assert opts["data_options"] == {"domain": "mr", "n_images": 4}
    assert opts["recipe"] == "*=layernorm" and opts["steps"] is None

    assert resolve_options(parse(registry, "--progress", "False"))["progress"] is False
    assert resolve_options(parse(registry, "--progress", "true"))["progress"] is True
    assert resolve_options(parse(registry, "--resume"))["resume"] is True
    assert resolve_options(parse(registry, "--config", str(cfg), "--progress"))["progress"] is True
    with pytest.raises(SystemExit):
        parse(registry, "--progress", "maybe")

    toml = tmp_path / "exp.toml"
    toml.write_text('backbone = "miss-tiny"\nsteps = 7\nevaluate = "false"\n[data_options]\nn_images = 3\n')
    opts = resolve_options(parse(registry, "--config", str(toml)))
    assert opts["steps"] == 7 and opts["evaluate"] is False and opts["data_options"] == {"n_images": 3}


def test_unknown_key_in_the_config_file_is_named(registry, tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("backbone: miss-tiny\nlearning_rate: 0.1\n")
    with pytest.raises(peftmed.UnknownNameError, match="'learning_rate'"):
        resolve_options(parse(registry, "--config", str(cfg)))


@pytest.mark.parametrize("argv, message", [
    (["--backbone", "miss-tny", "--recipe", "*=full", "--dataset", "phantom"], "unknown backbone 'miss-tny'"),
    (["--backbone", "miss-tiny", "--recipe", "*=lorra", "--dataset", "phantom"], "unknown method 'lorra'"),
    (["--backbone", "miss-tiny", "--recipe", "*=lora(rank=4)", "--dataset", "phantom"],
     "unknown option 'rank' for method 'lora'"),
    (["--backbone", "miss-tiny", "--recipe", "*=full", "--dataset", "phantom2"], "unknown dataset 'phantom2'"),
    (["--backbone", "miss-tiny", "--recipe", "*=full", "--dataset", "vqa-rad", "--steps", "1"], "--data-dir"),
    (["--backbone", "miss-tiny", "--recipe", "*=full", "--dataset", "phantom"], "no training budget"),
    (["--recipe", "*=full", "--dataset", "phantom", "--steps", "1"], "missing --backbone"),
    (["--backbone", "miss-tiny", "--recipe", "*=full", "--dataset", "phantom", "--steps", "1", "--data-options",
      "domian=mr"], "unknown option of dataset 'phantom' 'domian'; did you mean 'domain'?"),
])
def test_bad_names_fail_before_training(registry, tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["train", *argv, "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_train_resume_and_eval_end_to_end_on_phantom(registry, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--backbone", "miss-tiny", "--recipe", "fusion=lora(r=4,kernel=torch) decoder=layernorm",
              "--dataset", "phantom", "--data-options", "n_images=4", "--batch-size", "4", "--lr", "1e-3",
              "--max-new-tokens", "3", "--save-every", "2", "--progress", "false", "--output", str(out)]
    assert main(["train", *common, "--steps", "2"]) == 0
    assert main(["train", *common, "--steps", "3"]) == 2  # a checkpoint is there: --resume or another folder
    assert "--resume" in capsys.readouterr().err
    assert main(["train", *common, "--steps", "3", "--resume"]) == 0
    for name in ("adapter", "checkpoints", "metrics.json", "predictions.json", "train_config.json", "tokenizer"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["step"] == 3 and len(metrics["train"]["losses"]) == 3
    assert {"acc_closed", "acc_open", "acc_overall"} <= set(metrics["scores"])
    assert metrics["majority_baseline"]["n"] == metrics["scores"]["n"] == 16
    assert json.loads((out / "checkpoints" / "step-00000003" / "trainer.json").read_text())["step"] == 3

    # eval rebuilds the frozen base (seed, tokenizer) and loads the adapter: the same answers as training's
    assert main(["eval", "--adapter", str(out / "adapter"), "--progress", "false", "--max-new-tokens", "3",
                 "--output", str(tmp_path / "eval")]) == 0
    trained = json.loads((out / "predictions.json").read_text())
    again = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert [r["prediction"] for r in again] == [r["prediction"] for r in trained]
    assert [r["qid"] for r in again] == [r["qid"] for r in trained]

    # a recipe change against the existing checkpoint is refused, naming the difference
    changed = [a if a != "fusion=lora(r=4,kernel=torch) decoder=layernorm" else "fusion=lora(r=2,kernel=torch)"
               for a in common]
    assert main(["train", *changed, "--steps", "4", "--resume"]) == 2
    assert "decoder: checkpoint layernorm, this run frozen" in capsys.readouterr().err
