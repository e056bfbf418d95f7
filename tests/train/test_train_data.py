"""What `peftmed train` trains on: VQA-RAD's training questions that repeat a test question are dropped by
default (one log line; an option keeps them), and instruction-format data goes through the leak guard."""

import json

from peftmed.cli import main

COMMON = ["--backbone", "miss-tiny", "--recipe", "*=layernorm", "--dataset", "vqa-rad", "--batch-size", "4",
          "--steps", "1", "--max-new-tokens", "3", "--num-beams", "1", "--progress", "false"]


def test_vqa_rad_repeated_test_questions_are_dropped_by_default(vqa_rad_dir, tmp_path, capsys, caplog):
    assert main(["train", *COMMON, "--data-dir", str(vqa_rad_dir), "--evaluate", "false",
                 "--output", str(tmp_path / "a")]) == 0
    lines = [r.message for r in caplog.records if "repeat a test question" in r.message]
    assert len(lines) == 1 and "dropped 3 training question(s)" in lines[0] and "422, 78, 943" in lines[0]
    assert "train: 1795 questions" in capsys.readouterr().err
    caplog.clear()
    assert main(["train", *COMMON, "--data-dir", str(vqa_rad_dir), "--evaluate", "false",
                 "--train-test-overlap", "keep", "--output", str(tmp_path / "b")]) == 0
    assert "train: 1798 questions" in capsys.readouterr().err
    assert not [r for r in caplog.records if "repeat a test question" in r.message]


def test_instruction_format_trains_and_evaluates_on_rendered_questions(vqa_rad_dir, tmp_path, capsys):
    out = tmp_path / "inst"
    assert main(["train", *COMMON, "--data-dir", str(vqa_rad_dir), "--instruction-format", "true",
                 "--data-options", "skip_missing=false", "--output", str(out)]) == 0
    from peftmed.data import load_records

    rows = json.loads((out / "predictions.json").read_text())
    original = {r.qid: r.question for r in load_records("vqa-rad", "test", data_dir=vqa_rad_dir)}
    assert len(rows) == 450 and all("{" not in r["question"] for r in rows)
    assert all(r["question"] != original[r["qid"]] and original[r["qid"]].strip() in r["question"] for r in rows)
    # keeping the repeated questions and rendering instruction data is the reference code's leak: refused
    assert main(["train", *COMMON, "--data-dir", str(vqa_rad_dir), "--instruction-format", "true",
                 "--train-test-overlap", "keep", "--output", str(tmp_path / "leak")]) == 2
    assert "3 training record(s) are test questions" in capsys.readouterr().err
