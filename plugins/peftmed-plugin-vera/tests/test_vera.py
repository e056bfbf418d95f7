"""VeRA against the conformance kit, plus what differs in kind: seeded, shared, frozen matrices."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import peftmed  # noqa: E402
from peftmed.testing import conformance_tests, fresh_registry  # noqa: E402
from peftmed_vera import VeraLinear, shared_matrices  # noqa: E402

TestVeraConformance = conformance_tests(method_name="vera", options={"r": 16, "seed": 3})


def _vera_layers(pm):
    return [m for m in pm.modules() if isinstance(m, VeraLinear)]


def test_frozen_matrices_are_neither_trained_nor_saved(tmp_path):
    reg = fresh_registry()
    pm = peftmed.apply(peftmed.build_backbone("toy-vlm"), "fusion=vera(r=16)", registry=reg)
    layers = _vera_layers(pm)
    out_sizes = sum(layer.base_layer.out_features for layer in layers)
    # only lambda_d (r) and lambda_b (out) per layer train; A and B (r x in, out x r) do not
    assert pm.num_trainable() == 16 * len(layers) + out_sizes
    pm.save_adapter(tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "adapter.json").read_text())
    assert all("lambda" in name for name in manifest["tensors"]), list(manifest["tensors"])
    assert manifest["methods"]["fusion"][0]["config"]["seed"] == 0


def test_matrices_follow_from_the_seed_and_are_shared_slices():
    a_small, b_small = shared_matrices(7, 8, in_features=16, out_features=12)
    a_big, b_big = shared_matrices(7, 8, in_features=64, out_features=48)
    assert torch.equal(a_small, a_big[:, :16]) and torch.equal(b_small, b_big[:12])
    a_other, _ = shared_matrices(8, 8, in_features=16, out_features=12)
    assert not torch.equal(a_small, a_other)


def test_reload_regenerates_the_same_matrices(tmp_path):
    reg = fresh_registry()
    pm = peftmed.apply(peftmed.build_backbone("toy-vlm"), "fusion=vera(r=8,seed=5)", registry=reg)
    pm.save_adapter(tmp_path / "a")
    torch.manual_seed(123)  # the global RNG state must not matter
    loaded = peftmed.load_adapter(peftmed.build_backbone("toy-vlm"), tmp_path / "a", registry=reg)
    for mine, theirs in zip(_vera_layers(pm), _vera_layers(loaded)):
        assert all(torch.equal(x, y) for x, y in zip(mine.frozen_pair("default"), theirs.frozen_pair("default")))


@pytest.mark.parametrize("bad", ["r=0", "seed=-1", "dropout=1.5"])
def test_bad_options_name_the_value(bad):
    reg = fresh_registry()
    with pytest.raises(peftmed.ConfigError, match=bad.split("=")[0]):
        peftmed.apply(peftmed.build_backbone("toy-vlm"), f"fusion=vera({bad})", registry=reg)
