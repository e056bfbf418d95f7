"""The README's sentences a user acts on, run as written: every Python block, the merged-folder sentence, and
the JSONL image paths read from the JSONL's folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from peftmed.cli import main

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def _my_model() -> nn.Module:
    """What block 3 calls ``my_model``: a two-component model with the role map's module names."""
    torch.manual_seed(0)

    def layer() -> nn.Module:
        m = nn.Module()
        m.q_proj, m.v_proj, m.fc1, m.fc2 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 8)
        m.norm = nn.LayerNorm(8)
        return m

    model = nn.Module()
    model.image_encoder = nn.ModuleList([layer(), layer()])
    model.text_decoder = nn.ModuleList([layer(), layer()])
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder holding what the blocks name: scan.png and a trained run runs/ln (the README's train line)."""
    where = tmp_path_factory.mktemp("readme")
    Image.new("RGB", (48, 48), (90, 90, 90)).save(where / "scan.png")
    argv = ["train", "--backbone", "miss-tiny", "--recipe", "*=layernorm", "--dataset", "phantom", "--data-options",
            "n_images=8", "--steps", "2", "--batch-size", "4", "--evaluate", "false", "--progress", "false",
            "--output", str(where / "runs" / "ln")]
    assert main(argv) == 0
    return where


def test_the_readme_has_the_python_blocks_this_test_runs():
    assert len(BLOCKS) == 4
    assert "load_adapted" in BLOCKS[1] and "my_model" in BLOCKS[2] and "hookimpl" in BLOCKS[3]


def test_every_python_block_runs_as_written(folder, monkeypatch):
    monkeypatch.chdir(folder)
    scope: dict = {"my_model": _my_model(), "my_fresh_model": _my_model()}
    for i, block in enumerate(BLOCKS):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), scope)
    # block 1: the adapter was written and loads back; block 2: the 4 fields, and an answer
    assert (folder / "out" / "adapter" / "adapter.json").is_file()
    adapted = scope["adapted"]
    task, model, options, manifest = adapted
    assert model is adapted.model and options["backbone"] == "miss-tiny" and manifest["backbone"] == "miss-tiny"
    assert isinstance(adapted.model.answer(str(folder / "scan.png"), "is there a fracture?"), str)
    # block 3: the inline backbone's adapter trains what the recipe names and loads onto a fresh model
    trained = {n for n, p in scope["pm"].named_parameters() if p.requires_grad}
    assert any(".norm." in n for n in trained) and any("lora" in n for n in trained)
    assert (folder / "out" / "my-adapter" / "adapter.json").is_file()
    # block 4: a method plugin object with the name recipes write
    assert scope["HeadScale"]().name == "headscale"


def test_a_merged_miss_folder_loads_where_the_readme_says(folder, tmp_path):
    from peftmed.backbones.miss.checkpoint import from_pretrained
    from peftmed.backbones.miss.model import MissForVQA

    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(folder / "runs" / "ln" / "adapter"), "--output", str(merged)]) == 0
    assert json.loads((merged / "config.json").read_text())["model_type"] == "miss"
    assert "model_type: miss" in README and "not with `from_pretrained`" in README
    model = from_pretrained(merged, verbose=False)
    assert isinstance(model, MissForVQA)
    again = tmp_path / "again"
    assert main(["train", "--backbone", "miss-tiny", "--pretrained", str(merged), "--recipe", "decoder=lora(r=4)",
                 "--dataset", "phantom", "--data-options", "n_images=8", "--steps", "1", "--batch-size", "4",
                 "--evaluate", "false", "--progress", "false", "--output", str(again)]) == 0


def test_jsonl_image_paths_are_read_from_the_jsonl_folder(folder, tmp_path, monkeypatch, capsys):
    assert "a relative image path is read from\n  the JSONL file's folder" in README
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (48, 48), (30, 30, 30)).save(data / "a.png")
    (data / "q.jsonl").write_text(json.dumps({"image": "a.png", "question": "is there a fracture?"}) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a.png is not here
    assert main(["predict", "--adapter", str(folder / "runs" / "ln" / "adapter"), "--input", str(data / "q.jsonl"),
                 "--output", "answers.jsonl"]) == 0
    got = [json.loads(line) for line in (elsewhere / "answers.jsonl").read_text().splitlines()]
    assert len(got) == 1 and isinstance(got[0]["answer"], str)
