"""The trust defects as a user meets them: ``peftmed`` run in a subprocess, its exit code and the words of
its message. Nothing in a run folder names code to import; a non-empty output folder is refused unless
resumed or explicitly overwritten, and nothing a user put there is deleted; bad images fail before
training, naming the file and the question; bad values are refused naming the value."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import ok, peftmed, refused

TRAIN = ["--backbone", "miss-tiny", "--recipe", "fusion=lora(r=4,kernel=torch) decoder=layernorm",
         "--dataset", "phantom", "--batch-size", "4", "--lr", "1e-3", "--steps", "2", "--max-new-tokens", "3",
         "--progress", "false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "S"
    ok(peftmed("train", *TRAIN, "--data-options", "n_images=4", "--save-every", "1", "--output", out))
    return out


# ---- defect 2: nothing read from a run folder names code to import ---------------------------------
@pytest.mark.slow
def test_a_planted_class_name_in_the_run_folder_is_never_imported(run_dir, tmp_path):
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "PWNED"
    (evil / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Tok:\n    pass\n")
    (run_dir / "tokenizer" / "class.txt").write_text("evilmod:Tok\n")
    env = {"PYTHONPATH": os.pathsep.join([str(evil), os.environ.get("PYTHONPATH", "")])}
    try:
        ok(peftmed("eval", "--adapter", run_dir / "adapter", "--progress", "false", "--max-new-tokens", "3",
                   "--output", tmp_path / "eval", env=env))
        assert not marker.exists()
        ok(peftmed("train", *TRAIN, "--data-options", "n_images=4", "--steps", "3", "--resume", "--output", run_dir,
                   env=env))
        assert not marker.exists()
    finally:
        (run_dir / "tokenizer" / "class.txt").unlink(missing_ok=True)
    trained = json.loads((run_dir / "predictions.json").read_text())
    assert len(trained) == 16


# ---- defect 3: a reused output folder -------------------------------------------------------------
@pytest.mark.slow
def test_a_non_empty_output_is_refused_and_overwrite_replaces_only_peftmeds_files(tmp_path):
    out = tmp_path / "S"
    # the first run was interrupted before any checkpoint: its tokenizer and config are there
    first = peftmed("train", *TRAIN, "--data-options", "n_images=4", "--output", out, "--steps", "1")
    ok(first)
    for p in (out / "checkpoints", ):
        import shutil

        shutil.rmtree(p)
    (out / "adapter" / "adapter.json").unlink()
    (out / "adapter" / "adapter.safetensors").unlink()
    (out / "adapter" / "my-notes.txt").write_text("keep me")
    (out / "README.txt").write_text("mine too")

    second = TRAIN + ["--data-options", "n_images=4", "--data-options", "domain=mr", "--output", out]
    refused(peftmed("train", *second), f"output folder '{out}' is not empty", "--resume", "--overwrite")
    ok(peftmed("train", *second, "--overwrite"))
    assert (out / "adapter" / "my-notes.txt").read_text() == "keep me"
    assert (out / "README.txt").read_text() == "mine too"

    # the adapter remembers the second run's tokenizer and eval rebuilds the model with it
    manifest = json.loads((out / "adapter" / "adapter.json").read_text())
    identity = json.loads((out / "tokenizer" / "peftmed_tokenizer.json").read_text())
    assert manifest["tokenizer"]["sha256"] == identity["sha256"]
    ok(peftmed("eval", "--adapter", out / "adapter", "--progress", "false", "--max-new-tokens", "3",
               "--output", tmp_path / "eval"))
    trained = [r["prediction"] for r in json.loads((out / "predictions.json").read_text())]
    again = [r["prediction"] for r in json.loads((tmp_path / "eval" / "predictions.json").read_text())]
    assert again == trained

    # a tokenizer swapped under the adapter is refused, not silently used
    ok(peftmed("train", *TRAIN, "--data-options", "n_images=4", "--output", tmp_path / "T"))
    import shutil

    shutil.rmtree(out / "tokenizer")
    shutil.copytree(tmp_path / "T" / "tokenizer", out / "tokenizer")
    refused(peftmed("eval", "--adapter", out / "adapter", "--progress", "false"), "trained with another tokenizer")


@pytest.mark.slow
def test_resume_with_another_backbone_or_without_a_checkpoint_is_refused(run_dir, tmp_path):
    other = [a if a != "miss-tiny" else "hf-blip-vqa" for a in TRAIN]
    refused(peftmed("train", *other, "--resume", "--output", run_dir),
            "its run was trained with backbone 'miss-tiny'", "hf-blip-vqa")
    (tmp_path / "empty").mkdir()
    refused(peftmed("train", *TRAIN, "--resume", "--output", tmp_path / "empty"), "no checkpoint to resume from",
            "--overwrite")


# ---- defect 5: images -------------------------------------------------------------------------------
def _vqa_rad(folder: Path, image_names: list[str]):
    (folder / "images").mkdir(parents=True)
    good = Image.fromarray((np.random.default_rng(0).random((80, 80, 3)) * 255).astype("uint8"))
    good.save(folder / "images" / "good.jpg")
    data = (folder / "images" / "good.jpg").read_bytes()
    (folder / "images" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "images" / "notes.jpg").write_text("this is not an image")
    rows = [{"qid": 100 + i, "image_name": name, "question": "is there a lesion?", "answer": "yes",
             "answer_type": "CLOSED"} for i, name in enumerate(image_names)]
    (folder / "trainset.json").write_text(json.dumps(rows))
    (folder / "testset.json").write_text(json.dumps(rows[:1]))


@pytest.mark.parametrize("name, needle", [
    ("truncated.jpg", "image file is truncated"),
    ("notes.jpg", "not an image file Pillow can read"),
    ("../../../../etc/passwd", "leaves the dataset's image folder"),
    ("/etc/passwd", "not a path inside the dataset's image folder"),
])
def test_bad_images_fail_before_training_naming_file_and_question(tmp_path, name, needle):
    _vqa_rad(tmp_path / "data", ["good.jpg", "good.jpg", name, "good.jpg"])
    out = tmp_path / "run"
    proc = refused(peftmed("train", *[a if a != "phantom" else "vqa-rad" for a in TRAIN], "--data-dir",
                           tmp_path / "data", "--output", out), needle, "102")
    assert not (out / "checkpoints").exists()
    if "/" not in name:
        assert name in proc.stderr


def test_a_decompression_bomb_is_refused(tmp_path, monkeypatch):
    from peftmed.data import DataError
    from peftmed.data.images import verify_images
    from peftmed.data.records import VQARecord

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 80 x 80 image is then twice the limit and more
    _vqa_rad(tmp_path / "data", ["good.jpg"])
    rec = VQARecord(qid="7", question="q", answer="yes", answer_type="CLOSED",
                    image=str(tmp_path / "data" / "images" / "good.jpg"), image_id="good.jpg")
    with pytest.raises(DataError, match=r"(?s)'7'.*good.jpg.*decompression bomb"):
        verify_images([rec])


# ---- defect 7: bad values on the command line ------------------------------------------------------
def test_recipe_check_meta_takes_a_boolean():
    refused(peftmed("recipe", "check", "*=layernorm", "--backbone", "miss-tiny", "--meta", "maybe"),
            "expected a boolean", "'maybe'")


def test_bench_into_an_unwritable_folder_is_refused_before_any_work(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/peftmed-results"  # root writes everywhere else
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = tmp_path / "ro" / "results"
    refused(peftmed("bench", "--recipes", "*=layernorm", "--steps", "1", "--no-peft", "--output", target),
            "--output", "cannot be written")


@pytest.mark.slow
def test_a_malformed_adapter_manifest_is_an_error_from_eval(run_dir, tmp_path):
    bad = tmp_path / "adapter"
    import shutil

    shutil.copytree(run_dir / "adapter", bad)
    manifest = json.loads((bad / "adapter.json").read_text())
    manifest["methods"] = "x"
    (bad / "adapter.json").write_text(json.dumps(manifest))
    refused(peftmed("eval", "--adapter", bad, "--dataset", "phantom", "--progress", "false"),
            "methods is 'x'")


def test_disk_full_while_checkpointing_is_a_message(tmp_path, monkeypatch, capsys, registry):
    import torch

    from peftmed.cli import main
    from peftmed.train import checkpoint as ckpt

    real = torch.save

    def full(obj, fh, *a, **kw):
        real(obj, fh, *a, **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full)
    code = main(["train", *TRAIN, "--data-options", "n_images=4", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "could not write checkpoint step-00000002" in err and "No space left on device" in err
    assert "Traceback" not in err
    # --save-every 0 wrote nothing earlier: the message says the steps are lost instead of advising --resume
    assert "the 2 step(s) trained so far are lost" in err and "--resume" not in err


@pytest.mark.parametrize("change, needle", [
    (lambda c: c.pop("r"), "r is None; expected a positive integer"),
    (lambda c: c.update(alpha_pattern=5), "alpha_pattern is 5; expected a mapping"),
    (lambda c: c.update(target_modules=7), "target_modules is 7"),
])
def test_peft_import_with_a_bad_config_names_the_field(tmp_path, change, needle):
    from safetensors.torch import save_file
    import torch

    src = tmp_path / "peft"
    src.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query"]}
    change(config)
    (src / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(4, 4)}, str(src / "adapter_model.safetensors"))
    refused(peftmed("import", "--from", "peft", src, tmp_path / "out", "--backbone", "hf-blip-vqa"), needle)
