"""Property-based fuzzing of everything peftmed reads from a user: recipe text and JSON, experiment files,
adapter manifests and weight files. For any input, the only exception that may escape is a PeftmedError
(which the CLI prints as a message with exit code 2) - never a raw traceback.

CI runs a few thousand inputs in all (PEFTMED_FUZZ_EXAMPLES per test, default 600: 3,000 inputs); set it higher for a
longer search.
"""

import json
import os
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peftmed
from peftmed.errors import PeftmedError

EXAMPLES = int(os.environ.get("PEFTMED_FUZZ_EXAMPLES", "600"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                              HealthCheck.too_slow])
COMPONENTS = ["vision", "fusion", "decoder"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)

# recipe-like text: the parser's own alphabet, so the search reaches deep into it
recipe_text = st.lists(st.sampled_from(list("=()[],;+|*. \n\"'-_eE0123456789") + [
    "lora", "ia3", "prefix", "layernorm", "full", "frozen", "T", "F", "vision", "fusion", "decoder", "r", "alpha",
    "dropout", "roles", "attn.q", "n", "true", "none", "1e999", "nan", "-1"]), max_size=30).map("".join)


@pytest.fixture(scope="module")
def registry():
    return peftmed.build_registry(load_entrypoints=False)


def _check_recipe(recipe, registry):
    for calls in recipe.resolve(COMPONENTS).values():
        for call in calls:
            registry.method(call.name).make_config(call.options)
    text = recipe.to_text()
    if text:  # what prints must read back
        again = peftmed.Recipe.parse(text, components=COMPONENTS)
        assert again.to_text() == text


@FUZZ
@given(text=st.one_of(recipe_text, st.text(max_size=40)))
def test_recipe_text_raises_only_peftmed_errors(text, registry):
    try:
        _check_recipe(peftmed.Recipe.parse(text, components=COMPONENTS), registry)
    except PeftmedError:
        pass


@FUZZ
@given(data=json_values)
def test_recipe_json_raises_only_peftmed_errors(data, registry):
    try:
        _check_recipe(peftmed.Recipe.parse(data if isinstance(data, dict) else json.dumps(data),
                                           components=COMPONENTS), registry)
    except PeftmedError:
        pass


@FUZZ
@given(content=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())),
       suffix=st.sampled_from([".yaml", ".toml", ".json"]))
def test_experiment_files_raise_only_peftmed_errors(content, suffix, tmp_path_factory):
    from peftmed.run.config import DICT_OPTIONS, RUN_OPTIONS, TrainConfig, coerce, field_names, read_config_file

    path = tmp_path_factory.mktemp("cfg") / f"exp{suffix}"
    path.write_bytes(content)
    known = list(RUN_OPTIONS) + field_names(TrainConfig)
    try:
        values = read_config_file(path, known, mappings=DICT_OPTIONS)
        train = {k: coerce(TrainConfig, k, v) for k, v in values.items() if k in field_names(TrainConfig)}
        TrainConfig.from_dict({"steps": 1, **train})
    except PeftmedError:
        pass


def _saved_adapter(folder):
    import torch

    torch.manual_seed(0)
    pm = peftmed.apply(peftmed.build_backbone("toy-vlm"), "fusion=lora(r=2) decoder=layernorm")
    return pm.save_adapter(folder)


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory):
    folder = _saved_adapter(tmp_path_factory.mktemp("adapter") / "a")
    return json.loads((folder / "adapter.json").read_text()), (folder / "adapter.safetensors").read_bytes()


def _load(folder):
    import torch

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftmed.load_adapter(peftmed.build_backbone("toy-vlm"), folder)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


@FUZZ
@given(data=st.data())
def test_mutated_adapter_manifests_raise_only_peftmed_errors(data, adapter_files, tmp_path_factory):
    manifest, weights = adapter_files
    manifest = json.loads(json.dumps(manifest))
    path = data.draw(st.sampled_from(list(_paths(manifest))[1:]))
    target = manifest
    for key in path[:-1]:
        target = target[key]
    if data.draw(st.booleans()):
        target[path[-1]] = data.draw(json_values)
    elif isinstance(target, dict):
        del target[path[-1]]
    folder = tmp_path_factory.mktemp("m")
    (folder / "adapter.json").write_text(json.dumps(manifest))
    (folder / "adapter.safetensors").write_bytes(weights)
    try:
        _load(folder)
    except PeftmedError:
        pass


@FUZZ
@given(manifest_bytes=st.binary(max_size=300), cut=st.integers(0, 10**6), flip=st.integers(0, 10**6),
       garbage=st.booleans())
def test_damaged_adapter_files_raise_only_peftmed_errors(manifest_bytes, cut, flip, garbage, adapter_files,
                                                         tmp_path_factory):
    manifest, weights = adapter_files
    folder = tmp_path_factory.mktemp("w")
    (folder / "adapter.json").write_bytes(manifest_bytes if garbage else json.dumps(manifest).encode())
    damaged = bytearray(weights[: cut % (len(weights) + 1)])
    if damaged:
        damaged[flip % len(damaged)] ^= 0x5A
    (folder / "adapter.safetensors").write_bytes(bytes(damaged))
    try:
        _load(folder)
    except PeftmedError:
        pass
