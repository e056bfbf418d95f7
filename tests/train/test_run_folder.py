"""A run folder as users treat it: resumed with other options, edited by hand, used by two processes at once.
Everything read from it is checked like a manifest (the error names the file and the field); whatever decides
the frozen base model is fixed for the run's life; one process trains in a folder at a time."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cli_helpers import ok, peftmed, refused

TRAIN = ["--backbone", "miss-tiny", "--recipe", "fusion=lora(r=4,kernel=torch) decoder=layernorm",
         "--dataset", "phantom", "--data-options", "n_images=4", "--batch-size", "4", "--lr", "1e-3",
         "--max-new-tokens", "3", "--progress", "false"]


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "seed2"
    ok(peftmed("train", *TRAIN, "--seed", "2", "--steps", "2", "--save-every", "1", "--output", out))
    return out


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# ---- what decides the base model is the run's -----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("flag, value, needle", [
    ("--seed", "1", "trained with seed 2, this command gives 1"),
    ("--backbone-options", "size=base", "trained with backbone_options"),
    ("--pretrained", "elsewhere", "trained with pretrained None"),
])
def test_a_resume_that_would_change_the_base_model_is_refused(seeded_run, tmp_path, flag, value, needle):
    """`--resume --seed 1` on a seed-2 run used to warn about the data order only and go on training the adapter
    on another model (61 of 156 frozen tensors differed)."""
    run = _copy(seeded_run, tmp_path)
    before = (run / "train_config.json").read_text()
    refused(peftmed("train", *TRAIN, "--steps", "3", "--resume", flag, value, "--output", run), needle)
    assert (run / "train_config.json").read_text() == before


@pytest.mark.slow
def test_a_resume_without_the_seed_continues_on_the_runs_base_model(seeded_run, tmp_path):
    run = _copy(seeded_run, tmp_path)
    ok(peftmed("train", *TRAIN, "--steps", "3", "--resume", "--output", run))
    assert json.loads((run / "train_config.json").read_text())["seed"] == 2
    assert json.loads((run / "metrics.json").read_text())["train"]["step"] == 3


# ---- a hand-edited run folder is named, never a traceback -----------------------------------------------
def _edit(run, how):
    config = json.loads((run / "train_config.json").read_text())
    if how == "typo":
        config["bakcbone_options"] = config.pop("backbone_options")
    elif how == "seed text":
        config["seed"] = "abc"
    elif how == "options as a list":
        config["backbone_options"] = ["size", "tiny"]
    elif how == "not json":
        (run / "train_config.json").write_text("{'seed': 2,")
        return
    elif how == "garbage tokenizer":
        (run / "tokenizer" / "tokenizer.json").write_text("{\"model\": 12}")
        return
    (run / "train_config.json").write_text(json.dumps(config))


CASES = [("typo", "unknown option in", "'bakcbone_options'"), ("seed text", "train_config.json", "seed"),
         ("options as a list", "backbone_options must be a mapping", "['size', 'tiny']"),
         ("not json", "train_config.json is not valid JSON", ""),
         ("garbage tokenizer", "the tokenizer in", "cannot be read")]


@pytest.mark.slow
@pytest.mark.parametrize("how, needle, value", CASES)
def test_a_hand_edited_run_folder_is_named_by_predict_merge_and_eval(seeded_run, tmp_path, how, needle, value):
    run = _copy(seeded_run, tmp_path)
    _edit(run, how)
    image = next((run.parent / "img").glob("*.png")) if (run.parent / "img").is_dir() else None
    if image is None:
        from PIL import Image

        (run.parent / "img").mkdir(exist_ok=True)
        image = run.parent / "img" / "scan.png"
        Image.new("RGB", (32, 32), "gray").save(image)
    for args in (["predict", "--adapter", run / "adapter", "--image", image, "--question", "is it normal?"],
                 ["merge", "--adapter", run / "adapter", "--output", tmp_path / "merged"],
                 ["eval", "--adapter", run / "adapter", "--progress", "false", "--max-new-tokens", "3"]):
        refused(peftmed(*args), needle, value)


# ---- one process trains in a folder at a time ----------------------------------------------------------
@pytest.mark.slow
def test_a_second_process_training_in_the_same_folder_is_refused(seeded_run, tmp_path):
    from peftmed.run import RunLock

    run = _copy(seeded_run, tmp_path)
    with RunLock(run):  # as a first `peftmed train --resume` holds it
        refused(peftmed("train", *TRAIN, "--steps", "3", "--resume", "--output", run),
                "is in use: another peftmed process", f"pid {os.getpid()}")
    ok(peftmed("train", *TRAIN, "--steps", "3", "--resume", "--output", run))  # released: the resume runs


def test_the_lock_of_a_killed_process_is_not_stale(tmp_path):
    code = ("import sys, time\nfrom peftmed.run import RunLock\nRunLock(sys.argv[1]).acquire()\n"
            "print('held', flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    from peftmed.errors import ConfigError
    from peftmed.run import RunLock

    with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
        RunLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    time.sleep(0.1)
    RunLock(tmp_path).acquire().release()  # the kernel dropped the killed process's lock
