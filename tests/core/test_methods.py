"""Every built-in inject/select method on the toy backbone: identity at init, gradients only where the
recipe says, save/load round trip, merge equals unmerged, exact trainable counts, several adapters."""

import copy

import pytest
import torch

import peftmed
from peftmed.backbones.custom import ToyVLM

DIM, LAYERS, VOCAB, PATCH = 32, 2, 64, 8
LINEAR = DIM * DIM + DIM  # a DIM->DIM linear with bias
NORM = 2 * DIM

# merge vs unmerged tolerance per dtype (one table)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def fresh(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = peftmed.build_backbone("toy-vlm").to(dtype)
    return model, [t.to(dtype) if t.is_floating_point() else t for t in model.example_inputs()]


def perturb(pm, seed=1):
    """Move every trainable tensor away from its initial value (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))


@pytest.mark.parametrize("recipe", ["*=lora(r=4)", "fusion=ia3 decoder=ia3", "decoder=lora(r=2,rslora=true,init=gaussian)+ia3"])
def test_identity_at_initialisation(recipe):
    model, x = fresh()
    before = model(*x)
    pm = peftmed.apply(model, recipe)
    torch.testing.assert_close(pm(*x), before, rtol=0, atol=0)


EXPECTED = {
    # recipe -> trainable count derived from the toy's shapes by hand
    "fusion=lora(r=4)": LAYERS * 4 * 4 * (DIM + DIM),  # q and v of the self- and cross-attention per block
    "vision=lora(r=8,roles=[attn.q,attn.k,attn.v,attn.o])": LAYERS * 4 * 8 * 2 * DIM,
    # k, v outputs and the o input of the self- and cross-attention; fc2 input (4*DIM)
    "decoder=ia3": LAYERS * (6 * DIM + 4 * DIM),
    "*=layernorm": (LAYERS * 2 + 1) * NORM + LAYERS * 3 * NORM + (LAYERS * 3 + 1) * NORM,
    "fusion=ffn": LAYERS * (DIM * 4 * DIM + 4 * DIM + 4 * DIM * DIM + DIM),
    "fusion=attention(cross=false)": LAYERS * 4 * LINEAR,
    "fusion=attention": LAYERS * 8 * LINEAR,
    "vision=bitfit": DIM + LAYERS * (4 * DIM + DIM + 4 * DIM + DIM + DIM) + DIM,
    "decoder=full": None,  # every decoder parameter
    "fusion=lora(r=4,bias=lora_only)": LAYERS * 4 * (4 * 2 * DIM + DIM),
}


@pytest.mark.parametrize("recipe", list(EXPECTED))
def test_trainable_counts_are_exact_and_gradients_only_where_recipe_says(recipe):
    model, x = fresh()
    if EXPECTED[recipe] is None:
        expected = sum(p.numel() for p in model.decoder.parameters())
    else:
        expected = EXPECTED[recipe]
    pm = peftmed.apply(model, recipe)
    report = pm.trainable_report()
    assert report.trainable == expected
    assert pm.num_trainable() == expected
    assert report.total_base == sum(p.numel() for p in ToyVLM().parameters())
    added = expected if recipe.split("=")[1].startswith(("lora", "ia3")) and "bias=" not in recipe else None
    if added is not None:  # inject methods add every trainable parameter they have
        assert report.added == added
        assert report.percent_with_added == pytest.approx(100 * expected / (report.total_base + added))
    else:
        assert report.added == 0 or "bias=" in recipe
    pm(*x).square().mean().backward()
    trainable = {id(p) for p in pm.adapter_tensors().values()}
    for name, p in pm.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None, f"{name} is in the adapter but got no gradient"
        else:
            assert p.grad is None, f"{name} is frozen but got a gradient"


@pytest.mark.parametrize("recipe", ["vision=full fusion=lora(r=4,alpha=8) decoder=lora(r=4)+layernorm",
                                    "*=ia3", "fusion=bitfit decoder=ffn", "vision=attention fusion=lora(dropout=0.1)"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, recipe):
    model, x = fresh()
    pm = peftmed.apply(model, recipe)
    perturb(pm)
    pm.eval()
    out = pm(*x)
    pm.save_adapter(tmp_path / "adapter")
    model2, _ = fresh()  # same base weights (same seed)
    pm2 = peftmed.load_adapter(model2, tmp_path / "adapter")
    pm2.eval()
    torch.testing.assert_close(pm2(*x), out, rtol=0, atol=0)
    assert pm2.trainable_report().trainable == pm.trainable_report().trainable


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recipe", ["*=lora(r=4,alpha=8)", "*=ia3"])
def test_merge_equals_unmerged_and_unmerge_restores(recipe, dtype):
    model, x = fresh(dtype=dtype)
    pm = peftmed.apply(model, recipe)
    perturb(pm)
    pm.eval()
    base_w = model.fusion["blocks"][0].attn.v.weight.detach().clone()
    unmerged = pm(*x)
    pm.merge()
    torch.testing.assert_close(pm(*x), unmerged, **TOL[dtype])
    pm.unmerge()
    torch.testing.assert_close(model.fusion["blocks"][0].attn.v.weight, base_w, **TOL[dtype])
    torch.testing.assert_close(pm(*x), unmerged, **TOL[dtype])


def test_merge_and_unload_returns_plain_model_with_same_outputs():
    model, x = fresh()
    pm = peftmed.apply(model, "fusion=lora(r=4) decoder=ia3")
    perturb(pm)
    out = pm(*x)
    plain = pm.merge_and_unload()
    assert not any(isinstance(m, peftmed.AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(plain(*x), out, rtol=1e-5, atol=1e-5)


def test_several_named_adapters_one_active_and_base_restored():
    model, x = fresh()
    base_out = model(*x)
    pm = peftmed.apply(model, "fusion=lora(r=4) decoder=layernorm", adapter_name="a")
    perturb(pm, seed=1)
    out_a = pm(*x)
    pm.add_adapter("b", "decoder=full")
    assert pm.active_adapter == "b"
    torch.testing.assert_close(pm(*x), base_out)  # fresh b, a switched off, a's LayerNorm values put away
    perturb(pm, seed=2)
    out_b = pm(*x)
    assert not torch.allclose(out_b, base_out)
    pm.set_adapter("a")
    torch.testing.assert_close(pm(*x), out_a)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "norm" in n for n in trainable)
    pm.set_adapter("b")
    torch.testing.assert_close(pm(*x), out_b)
    with pm.disable_adapter():
        torch.testing.assert_close(pm(*x), base_out)
    pm.remove_adapter("b")
    pm.set_adapter("a")
    torch.testing.assert_close(pm(*x), out_a)


def test_lora_dropout_is_active_in_train_mode_only():
    model, x = fresh()
    pm = peftmed.apply(model, "*=lora(r=4,dropout=0.5)")
    perturb(pm)
    pm.eval()
    a, b = pm(*x), pm(*x)
    torch.testing.assert_close(a, b)
    pm.train()
    torch.manual_seed(0)
    c = pm(*x)
    assert not torch.allclose(a, c)


def test_custom_model_with_user_role_map():
    """The library API for a user's own Med-VLM: a role map in a few lines."""

    class MyVLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image_encoder = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.LayerNorm(16))
            self.text_decoder = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(16, 16), "v_proj": torch.nn.Linear(16, 16)})

        def forward(self, x):
            h = self.image_encoder(x)
            return self.text_decoder["v_proj"](self.text_decoder["q_proj"](h))

    bb = peftmed.Backbone(name="my-vlm", components={"vision": "image_encoder", "decoder": "text_decoder"},
                          roles={"attn.q": r"q_proj$", "attn.v": r"v_proj$"})
    m = MyVLM()
    x = torch.randn(3, 12)
    before = m(x)
    pm = peftmed.apply(m, "vision=layernorm decoder=lora(r=2)", backbone=bb)
    assert pm.trainable_report().trainable == 2 * 16 + 2 * 2 * (16 + 16)
    torch.testing.assert_close(pm(x), before)
    copy.deepcopy(pm)  # a PeftModel can be copied (e.g. for baselines)


def test_removing_an_adapter_removes_its_side_tables_and_unmerges_it():
    """The base layer owns the bookkeeping: IA3's on_input entry goes with the adapter, and removing a
    merged adapter restores the base weights."""
    torch.manual_seed(0)
    model = peftmed.build_backbone("toy-vlm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = peftmed.apply(model, "fusion=ia3", adapter_name="a")
    pm.add_adapter("b", "fusion=ia3")
    layers = [m for m in pm.modules() if isinstance(m, peftmed.AdapterLayer)]
    assert layers and all(set(layer.on_input) == {"a", "b"} for layer in layers)
    with torch.no_grad():
        for p in pm.adapter_tensors("b").values():
            p.mul_(1.5)
    pm.remove_adapter("a")
    assert all(set(layer.on_input) == {"b"} for layer in layers)
    pm.set_adapter("b")
    pm.merge()
    pm.remove_adapter("b")
    after = model.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
