"""peftmed predict on real VQA-RAD images: the answer of the adapter's run model (the same as the library's
pm.answer and as evaluation's generation), a JSONL of questions batched, reports, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

QUESTION = "is there a fracture of the rib?"


def _run(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "peftmed", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory, vqa_rad_dir):
    """A miss-tiny run trained for 3 steps on VQA-RAD (its tokenizer trained on VQA-RAD's texts)."""
    folder = tmp_path_factory.mktemp("predict")
    r = _run("train", "--backbone", "miss-tiny", "--recipe", "*=lora(r=4)", "--dataset", "vqa-rad", "--data-dir",
             str(vqa_rad_dir), "--steps", "3", "--batch-size", "4", "--evaluate", "false", "--progress", "false",
             "--output", "run", cwd=folder)
    assert r.returncode == 0, r.stderr
    return folder


def _images(vqa_rad_dir, n):
    return sorted((vqa_rad_dir / "images").iterdir())[:n]


def test_one_question_about_a_real_image_matches_the_library_answer(run, vqa_rad_dir):
    import peftmed
    from peftmed.deploy import load_adapted

    image = _images(vqa_rad_dir, 1)[0]
    r = _run("predict", "--adapter", "run/adapter", "--image", str(image), "--question", QUESTION, cwd=run)
    assert r.returncode == 0, r.stderr
    printed = r.stdout.strip()
    assert printed and "\n" not in printed
    _, model, opts, _ = load_adapted(run / "run" / "adapter", device="cpu")
    pm = peftmed.find_peft_model(model) if hasattr(peftmed, "find_peft_model") else model
    assert opts["dataset"] == "vqa-rad"
    assert pm.answer(image, QUESTION) == printed


def test_a_jsonl_of_questions_is_answered_in_order(run, vqa_rad_dir):
    images = _images(vqa_rad_dir, 3)
    lines = [{"id": f"q{i}", "image": str(p), "question": q}
             for i, (p, q) in enumerate(zip(images, [QUESTION, "what organ is shown?", "is this a ct scan?"]))]
    (run / "questions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    r = _run("predict", "--adapter", "run/adapter", "--input", "questions.jsonl", "--output", "answers.jsonl",
             "--batch-size", "2", cwd=run)
    assert r.returncode == 0, r.stderr
    got = [json.loads(x) for x in (run / "answers.jsonl").read_text().splitlines()]
    assert [g["id"] for g in got] == ["q0", "q1", "q2"] and all(isinstance(g["answer"], str) for g in got)
    one = _run("predict", "--adapter", "run/adapter", "--image", str(images[0]), "--question", QUESTION, cwd=run)
    assert got[0]["answer"] == one.stdout.strip()  # batched as alone


def test_a_long_question_is_answered_with_a_note(run, vqa_rad_dir):
    long = " ".join(["is there evidence of a fracture of the left rib"] * 8) + "?"
    r = _run("predict", "--adapter", "run/adapter", "--image", str(_images(vqa_rad_dir, 1)[0]), "--question", long,
             cwd=run)
    assert r.returncode == 0, r.stderr
    assert "1 question(s) were longer than the model's limit of 35 tokens; they were cut to it" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--image", "missing.png", "--question", "q?"], "image 'missing.png': image file not found"),
    (["--image", "bad.png", "--question", "q?"], "bad.png"),
    (["--image", "IMG"], "--image needs --question"),
    (["--input", "bad.jsonl"], "bad.jsonl:2: no \"question\""),
    (["--image", "IMG", "--question", "q?", "--task", "report"], "was trained for the task 'vqa'"),
    (["--question", "q?"], "pass either --image"),
])
def test_bad_input_is_named(run, vqa_rad_dir, args, message):
    (run / "bad.png").write_bytes(b"not an image")
    image = str(_images(vqa_rad_dir, 1)[0])
    (run / "bad.jsonl").write_text(json.dumps({"image": image, "question": "q?"}) + "\n" + json.dumps({"image": image})
                                   + "\n")
    r = _run("predict", "--adapter", "run/adapter", *[image if a == "IMG" else a for a in args], cwd=run)
    assert r.returncode == 2, r.stdout
    assert message in r.stderr and "Traceback" not in r.stderr


def test_a_report_adapter_writes_a_report(tmp_path, vqa_rad_dir):
    r = _run("train", "--backbone", "miss-tiny", "--recipe", "*=lora(r=4)", "--dataset", "phantom-report",
             "--data-options", "n_images=8", "--steps", "2", "--batch-size", "4", "--evaluate", "false",
             "--progress", "false", "--output", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    p = _run("predict", "--adapter", "run/adapter", "--task", "report", "--image", str(_images(vqa_rad_dir, 1)[0]),
             "--max-new-tokens", "12", "--num-beams", "1", "--output", "report.jsonl", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    row = json.loads((tmp_path / "report.jsonl").read_text())
    assert set(row) >= {"image", "report"} and isinstance(row["report"], str)
