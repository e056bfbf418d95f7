"""``peftmed train --task report`` and ``peftmed eval --task report`` on miss-tiny and phantom reports."""

import json

from peftmed.cli import main

COMMON = ["--backbone", "miss-tiny", "--recipe", "*=layernorm", "--dataset", "phantom-report",
          "--data-options", "n_images=8", "--backbone-options", "max_position_embeddings=128",
          "--batch-size", "4", "--max-new-tokens", "6", "--num-beams", "1", "--progress", "false"]


def test_train_then_eval_report(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *COMMON, "--task", "report", "--steps", "2", "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "report" and len(metrics["train"]["losses"]) == 2
    for key in ("bleu_4", "rouge_l", "cider", "meteor", "findings_f1"):
        assert key in metrics["scores"] and key in metrics["most_frequent_report_baseline"]
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == 8 and {"id", "reference", "prediction"} <= set(preds[0])
    assert (out / "adapter").is_dir()
    printed = capsys.readouterr().out
    assert "BLEU-4" in printed and "most-frequent-report baseline" in printed

    # eval rebuilds the same base model (seed, tokenizer) and scores the same predictions
    ev = tmp_path / "eval"
    assert main(["eval", "--adapter", str(out / "adapter"), "--max-new-tokens", "6", "--num-beams", "1",
                 "--progress", "false", "--output", str(ev)]) == 0
    again = json.loads((ev / "predictions.json").read_text())
    assert [p["prediction"] for p in again] == [p["prediction"] for p in preds]


def test_task_and_dataset_must_agree(tmp_path, capsys):
    assert main(["train", *COMMON[:4], "--dataset", "phantom", "--task", "report", "--steps", "1",
                 "--output", str(tmp_path / "x")]) == 2
    assert "needs a report dataset" in capsys.readouterr().err
    assert main(["train", *COMMON, "--task", "caption", "--steps", "1", "--output", str(tmp_path / "y")]) == 2
    assert "unknown task 'caption'" in capsys.readouterr().err


def test_an_explicit_max_new_tokens_of_10_is_kept_for_reports(tmp_path):
    """10 used to mean 'unset' and became 100 for reports; now unset is None and 10 means 10."""
    from peftmed.backbones.miss.tokenizer import MissTokenizer

    out = tmp_path / "run"
    common = [a if a != "6" else "10" for a in COMMON]  # --max-new-tokens 10
    assert main(["train", *common, "--task", "report", "--steps", "1", "--output", str(out)]) == 0
    tok = MissTokenizer.load(out / "tokenizer")
    preds = [p["prediction"] for p in json.loads((out / "predictions.json").read_text())]
    lengths = [len(tok.tokenize(p)) for p in preds]  # re-tokenised text: a few pieces more than generated
    assert 8 <= max(lengths) < 20  # an untrained model runs to the limit: 10 tokens, not 100
    assert json.loads((out / "train_config.json").read_text())["max_new_tokens"] == 10
