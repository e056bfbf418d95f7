"""Answers the model can reach: the generation length is derived from the training answers (in each model's
own tokens) unless set, the training answer length is raised to fit them, and every run says how many test
answers it can reach. With the old fixed 10 tokens, 19 (miss-tiny), 45 (hf-blip-vqa tiny) and 58 (LLaVA: 12.9%)
of VQA-RAD's 450 test answers could never be produced."""

import json

import pytest

import peftmed
from peftmed.cli import main
from peftmed.data import load_records
from peftmed.tasks import answer_lengths


@pytest.fixture(scope="module")
def rad(vqa_rad_dir):
    train = load_records("vqa-rad", "train", data_dir=vqa_rad_dir)
    test = load_records("vqa-rad", "test", data_dir=vqa_rad_dir)
    return train, test


@pytest.mark.parametrize("backbone, unreachable_at_10", [("miss-tiny", 19), ("hf-blip-vqa", 45), ("hf-llava", 58)])
def test_every_test_answer_a_training_answer_can_bound_is_reachable(rad, backbone, unreachable_at_10):
    train, test = rad
    model = peftmed.build_backbone(backbone, texts=[r.question for r in train] + [r.answer for r in train])
    answers = [r.answer for r in train], [r.answer for r in test]
    fixed = answer_lengths(model, *answers, max_new_tokens=10, fix_training_cap=False)
    assert fixed.total - fixed.reachable == unreachable_at_10 and not fixed.derived
    derived = answer_lengths(model, *answers)
    assert derived.derived and derived.max_new_tokens == derived.longest + 2
    # only answers longer than every training answer stay out of reach (one question on VQA-RAD's test split)
    count = model.answer_tokens
    assert all(count(a) > derived.longest + 2 for a in derived.unreachable)
    assert derived.total - derived.reachable <= 1
    # the loss sees the longest training answer whole
    cap = derived.training_cap
    assert cap is not None and cap >= derived.longest


def test_train_derives_the_length_eval_and_predict_reuse_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--backbone", "miss-tiny", "--recipe", "decoder=layernorm", "--dataset", "phantom",
                 "--data-options", "n_images=4", "--steps", "1", "--batch-size", "4", "--progress", "false",
                 "--output", str(out)]) == 0
    err = capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    answers = metrics["answers"]
    assert answers["derived"] and answers["max_new_tokens"] == answers["longest"] + 2
    assert answers["reachable"] == answers["total"] == metrics["n_eval"]
    assert f"generating up to {answers['max_new_tokens']} (derived from the data)" in err
    assert json.loads((out / "train_config.json").read_text())["max_new_tokens"] == answers["max_new_tokens"]
    assert main(["eval", "--adapter", str(out / "adapter"), "--progress", "false", "--output",
                 str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["max_new_tokens"] == answers["max_new_tokens"]
    assert main(["eval", "--adapter", str(out / "adapter"), "--progress", "false", "--max-new-tokens", "1"]) == 0
    err = capsys.readouterr().err
    assert "generating up to 1; 14 of 16 test answers are reachable (not: 'lung', 'contrast ct')" in err
