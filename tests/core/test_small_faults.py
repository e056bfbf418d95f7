"""The small faults of the trust round, each as a user meets it: a value that cannot work is refused by name
(exit 2, no traceback), a file read from disk that was damaged or edited is named, nothing is overwritten
silently."""

import json

import pytest
import torch

from peftmed.cli import main
from peftmed.errors import PeftmedError

TRAIN = ["train", "--backbone", "miss-tiny", "--recipe", "decoder=lora(r=4,kernel=torch)", "--dataset", "phantom",
         "--data-options", "n_images=4", "--batch-size", "4", "--max-new-tokens", "3", "--progress", "false"]


def refused(capsys, argv, *needles):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_adam_eps_zero_is_refused(capsys, tmp_path):
    """It used to train: 20 of 40 adapter tensors NaN after one step, exit 0."""
    refused(capsys, [*TRAIN, "--steps", "1", "--adam-eps", "0", "--output", tmp_path / "r"], "adam_eps must be a positive")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--gpu-gb", "inf"], "--gpu-gb must be a GPU's memory"),
    (["--gpu-gb", "1e30"], "--gpu-gb must be a GPU's memory"),
    (["--gpu-gb", "24", "--reserve-gb", "nan"], "--reserve-gb must be 0 or more GB, got nan"),
    (["--gpu-gb", "24", "--reserve-gb", "-5"], "--reserve-gb must be 0 or more GB, got -5"),
    (["--gpu-gb", "24", "--reserve-gb", "30"], "leaves nothing of --gpu-gb 24"),
    (["--device", "cuda:7"], "device 'cuda:7'"),
    (["--batch-size", "1000000"], "--batch-size must be a whole number from 1 to 4,096"),
    (["--image-size", "100000"], "--image-size must be a whole number from 1 to 4,096"),
])
def test_plan_refuses_numbers_that_cannot_be_a_plan(capsys, extra, needle):
    if extra[0] == "--device" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    refused(capsys, ["plan", "--backbone", "miss-tiny", "--recipe", "*=layernorm", *extra], needle)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    assert main([*TRAIN, "--steps", "1", "--output", str(out)]) == 0
    from PIL import Image

    Image.new("RGB", (40, 40), "gray").save(out.parent / "scan.png")
    return out / "adapter"


def test_predict_refuses_a_generation_longer_than_the_model_holds(capsys, adapter):
    refused(capsys, ["predict", "--adapter", adapter, "--image", adapter.parent.parent / "scan.png", "--question", "q?",
                     "--max-new-tokens", "100000000"], "max_new_tokens 100000000 is more than this model can generate")


@pytest.mark.parametrize("content, needle", [
    ('{"image": "scan.png", "question": "caf\xe9?"}\n'.encode("latin-1"), "is not UTF-8 text"),
    (("[" * 100_000 + "]" * 100_000 + "\n").encode(), "nested too deeply"),
], ids=["latin-1", "100k-deep"])
def test_predict_names_an_input_it_cannot_read(capsys, adapter, tmp_path, content, needle):
    (tmp_path / "q.jsonl").write_bytes(content)
    refused(capsys, ["predict", "--adapter", adapter, "--input", tmp_path / "q.jsonl"], needle)


def test_predict_never_overwrites_silently(capsys, adapter, tmp_path):
    scan = adapter.parent.parent / "scan.png"
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"image": str(scan), "question": "is it normal?"}) + "\n")
    before = questions.read_text()
    refused(capsys, ["predict", "--adapter", adapter, "--input", questions, "--output", questions],
            "is the --input file")
    assert questions.read_text() == before
    (tmp_path / "a.jsonl").write_text("mine\n")
    refused(capsys, ["predict", "--adapter", adapter, "--input", questions, "--output", tmp_path / "a.jsonl"],
            "exists; pass --overwrite")
    assert (tmp_path / "a.jsonl").read_text() == "mine\n"
    assert main(["predict", "--adapter", str(adapter), "--input", str(questions), "--output",
                 str(tmp_path / "a.jsonl"), "--overwrite"]) == 0
    assert json.loads((tmp_path / "a.jsonl").read_text())["question"] == "is it normal?"


def test_text_cells_are_never_spreadsheet_formulas():
    from peftmed.bench.results import tidy_csv

    text = tidy_csv([{"label": '=HYPERLINK("http://x","y")', "provider": "peftmed", "status": "ok", "acc": 0.5},
                     {"label": "+1-2", "provider": "peftmed", "status": "failed", "error": "@SUM(A1)"}])
    cells = [c for line in text.splitlines()[1:] for c in line.split(",")]
    assert not any(c.lstrip('"')[:1] in "=+-@" for c in cells if c and not _number(c)), text


def _number(cell):
    try:
        float(cell)
        return True
    except ValueError:
        return False


def test_labels_are_literal_text_in_markdown():
    from peftmed.bench.report import md_text

    assert md_text("a|b <img src=x onerror=alert(1)> *x*") == "a\\|b \\<img src=x onerror=alert\\(1\\)\\> \\*x\\*"


def test_a_latest_pointer_leaving_the_run_is_refused(tmp_path):
    from peftmed.train.checkpoint import CheckpointError, latest_checkpoint

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "trainer.json").write_text("{}")
    (tmp_path / "checkpoints").mkdir()
    for name in ("../elsewhere", "/etc", "step-1/../../elsewhere"):
        (tmp_path / "checkpoints" / "latest").write_text(name + "\n")
        with pytest.raises(CheckpointError, match="not a checkpoint of this folder"):
            latest_checkpoint(tmp_path / "checkpoints")


def test_a_state_file_holding_objects_is_refused_without_torchs_advice(tmp_path):
    from peftmed.train.checkpoint import CheckpointError, read_state

    from fractions import Fraction  # any object that is not a tensor or a plain value

    torch.save({"optimizer": Fraction(1, 3)}, tmp_path / "trainer_state.pt")
    with pytest.raises(CheckpointError) as info:
        read_state(tmp_path)
    assert "weights_only=False" not in str(info.value) and "never unpickles" in str(info.value)


def test_an_adapter_of_a_newer_format_is_refused_once(tmp_path):
    import peftmed
    from peftmed.model import read_manifest

    pm = peftmed.apply(peftmed.build_backbone("toy-vlm"), "decoder=layernorm")
    folder = pm.save_adapter(tmp_path / "a")
    manifest = json.loads((folder / "adapter.json").read_text())
    manifest["format_version"] = 999
    (folder / "adapter.json").write_text(json.dumps(manifest))
    with pytest.raises(PeftmedError, match="adapter format 999; this peftmed .* reads format 1"):
        read_manifest(folder)


@pytest.mark.parametrize("name, text, needle", [
    ("deep.toml", "a = " + "[" * 5000 + "]" * 5000, "nested too deeply"),
    ("twice.yaml", "lr: 0.1\nsteps: 3\nlr: 0.2\n", "the key 'lr' is written twice (line 3)"),
], ids=["deep-toml", "duplicate-yaml-key"])
def test_experiment_files_that_cannot_mean_one_thing_are_named(capsys, tmp_path, name, text, needle):
    (tmp_path / name).write_text(text)
    refused(capsys, ["train", "--config", tmp_path / name], needle)


def test_config_values_of_the_wrong_type_are_named(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("backbone: [miss-tiny]\n")
    refused(capsys, ["train", "--config", tmp_path / "c.yaml"], "backbone in", "expects a string")
    (tmp_path / "d.yaml").write_text("resume: perhaps\n")
    refused(capsys, ["train", "--config", tmp_path / "d.yaml"], "resume in", "expects true or false, got 'perhaps'")


def test_bitsandbytes_is_imported_only_for_4_bit_and_quietly():
    """Every bench and export printed bitsandbytes' 'Failed to load CPU gemm_4bit_forward' although nothing was
    4-bit: listings and help never import it, and peft's import of it (peft imports it when installed) is quiet."""
    import logging
    import subprocess
    import sys

    probe = ("import sys; from peftmed.cli import main\n"
             "for argv in (['methods'], ['backbones'], ['bench', '--help'], ['plan', '--help']):\n"
             "    try: main(argv)\n"
             "    except SystemExit: pass\n"
             "print('bitsandbytes' in sys.modules, 'peft' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False False"

    from peftmed.memory.quantize import quiet_bitsandbytes_import

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    try:
        with quiet_bitsandbytes_import():
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("after")
    finally:
        logging.getLogger().removeHandler(handler)
    assert [r.getMessage() for r in records] == ["after"]
