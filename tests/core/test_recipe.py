"""Recipes: text and JSON forms, the papers' row form, round trips, and parse errors."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftmed import Recipe, RecipeError
from peftmed.recipe import MethodCall

COMPONENTS = ["vision", "fusion", "decoder"]


def test_text_form_parses_components_methods_and_typed_options():
    r = Recipe.parse("vision=full fusion=lora(r=8,alpha=16.5,rslora=true,init=gaussian) decoder=lora(r=8)+layernorm")
    assert r.entries["vision"] == (MethodCall("full"),)
    lora = r.entries["fusion"][0]
    assert lora.name == "lora" and lora.options == {"r": 8, "alpha": 16.5, "rslora": True, "init": "gaussian"}
    assert isinstance(lora.options["r"], int)
    assert [c.name for c in r.entries["decoder"]] == ["lora", "layernorm"]


def test_round_trip_text_object_text_and_json():
    text = "vision=full fusion=lora(r=8,alpha=16,roles=[attn.q,attn.v]) decoder=prefix(n=10,init=\"from text\")"
    r = Recipe.parse(text)
    assert Recipe.parse(r.to_text()) == r
    assert r.to_text() == text
    assert Recipe.parse(r.to_json()) == r
    assert Recipe.from_dict(json.loads(r.to_json())) == r


def test_wildcard_expands_to_unnamed_components_and_unnamed_are_frozen():
    r = Recipe.parse("*=layernorm decoder=lora(r=4)")
    resolved = r.resolve(COMPONENTS)
    assert [c.name for c in resolved["vision"]] == ["layernorm"]
    assert [c.name for c in resolved["decoder"]] == ["lora"]
    only = Recipe.parse("fusion=ia3").resolve(COMPONENTS)
    assert set(only) == {"fusion"}


def test_row_form_maps_cells_positionally():
    import peftmed

    registry = peftmed.build_registry(load_entrypoints=False)
    r = Recipe.parse("T|LoRA|LoRA", components=COMPONENTS).canonical(registry)
    assert "vision" in r.entries and r.entries["vision"][0].name == "full"
    assert r.entries["fusion"][0].name == "lora"
    r2 = Recipe.parse("F|PTV2|lora(r=4)", components=COMPONENTS).canonical(registry)
    assert r2.entries["vision"][0].name == "frozen" and "vision" not in r2.trained(COMPONENTS, registry)
    assert r2.entries["fusion"][0].name == "ptuning-v2"
    assert r2.entries["decoder"][0].options == {"r": 4}
    assert r.row(COMPONENTS) == "full|lora|lora"
    assert r2.row(COMPONENTS, registry) == "F|PTV2|LoRA"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("fusion=lora(r=8", "expected ',' or ')'"),
        ("fusion lora", "expected items"),
        ("fusion=lora fusion=ia3", "assigned twice"),
        ("fusion=lora+lora", "appears twice"),
        ("fusion=lora(r=8,r=4)", "given twice"),
        ("", "empty recipe"),
        ("T|LoRA", "component order"),
    ],
)
def test_parse_errors_are_clear(text, needle):
    with pytest.raises(RecipeError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        Recipe.parse(text)


def test_row_with_wrong_cell_count_names_components():
    with pytest.raises(RecipeError, match="vision|fusion|decoder"):
        Recipe.parse("T|LoRA", components=COMPONENTS)


def test_unknown_component_lists_known_ones():
    with pytest.raises(KeyError, match="did you mean 'fusion'"):
        Recipe.parse("fuson=lora").resolve(COMPONENTS)


names = st.sampled_from(["lora", "ia3", "layernorm", "prefix", "full", "my-method.v2"])
values = st.one_of(
    st.integers(-1000, 1000), st.booleans(), st.sampled_from(["gaussian", "attn.q", "with space", "a,b"]),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
    st.lists(st.sampled_from(["attn.q", "attn.v", "mlp.up"]), min_size=1, max_size=3),
)
calls = st.builds(MethodCall, names, st.dictionaries(st.sampled_from(["r", "alpha", "roles", "init", "n"]), values, max_size=3))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(COMPONENTS + ["*"]), st.lists(calls, min_size=1, max_size=2, unique_by=lambda c: c.name), min_size=1))
def test_any_recipe_round_trips(entries):
    r = Recipe({k: tuple(v) for k, v in entries.items()})
    back = Recipe.parse(r.to_text())
    assert back.to_dict() == json.loads(json.dumps(r.to_dict()))
