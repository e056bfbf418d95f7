"""Prefix-tuning and P-Tuning v2 on the toy backbone: identity at n=0, the explicit reference,
gradients, training, save/load, fold, recipes that mix families, options and bad input."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import peftmed  # noqa: E402
from peftmed.backbones.custom import TOY_ROLES, ToyVLM  # noqa: E402
from peftmed.errors import ConfigError, RecipeError  # noqa: E402
from peftmed.methods.prompt import DeepPrompts, fold_prompts  # noqa: E402


def toy(seed=0):
    torch.manual_seed(seed)
    return peftmed.build_backbone("toy-vlm").eval()


def inputs(model, batch=2, seed=1):
    return model.example_inputs(batch=batch, generator=torch.Generator().manual_seed(seed))


def prompt_modules(pm):
    return list(pm.prompt_modules.values())


def randomise_(pm, seed=3):
    """Give the prompt parameters values a trained adapter would have (not the init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.adapter_tensors().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("recipe", [
    "*=prefix(n=3,cross=true)", "*=ptuning-v2(n=3,cross=true)", "decoder=prefix(n=3,shared=true)",
])
def test_a_disabled_prompt_adapter_leaves_the_model_unchanged(recipe):
    model = toy()
    x = inputs(model)
    expected = model(*x)
    pm = peftmed.apply(model, recipe)
    randomise_(pm)
    assert not torch.equal(pm(*x), expected)
    with pm.disable_adapter():  # the hooks stay in the attention modules, the prefix is not used
        assert torch.equal(pm(*x), expected)


@pytest.mark.parametrize("method", ["prefix", "ptuning-v2"])
def test_zero_virtual_tokens_are_refused(method):
    """A prefix of no tokens trains nothing: the silently inert prefix of the reference code."""
    with pytest.raises(peftmed.ConfigError, match="would train nothing"):
        peftmed.apply(toy(), f"*={method}(n=0)")


def explicit_attention(attn, x, pk, pv, causal):
    """Toy attention over [prefix; sequence], written out: the prefix repeated per sample and
    concatenated, one softmax, the prefix visible to every query."""
    b, t, d = x.shape
    h, hd = attn.num_heads, attn.head_dim
    split = lambda y: y.view(b, t, h, hd).transpose(1, 2)  # noqa: E731  (B, H, T, D)
    q, k, v = split(attn.q(x)), split(attn.k(x)), split(attn.v(x))
    k = torch.cat([pk.expand(b, -1, -1, -1), k], dim=2)
    v = torch.cat([pv.expand(b, -1, -1, -1), v], dim=2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if causal:
        p = pk.shape[-2]
        allowed = torch.ones(t, p + t, dtype=torch.bool).tril(p)
        scores = scores.masked_fill(~allowed, float("-inf"))
    out = scores.softmax(-1) @ v
    return attn.o(out.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("method", ["prefix", "ptuning-v2"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_output_equals_explicit_concatenation_reference(method, causal):
    model = toy()
    pm = peftmed.apply(model, "decoder=prefix(n=5)".replace("prefix", method))
    randomise_(pm)
    module = prompt_modules(pm)[0]
    attn = model.decoder["blocks"][1].attn
    pk, pv = module.prefix(1)
    assert pk.shape == (attn.num_heads, 5, attn.head_dim)  # held once, broadcast over the batch
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, causal=causal), explicit_attention(attn, x, pk, pv, causal))
        # and the prefix does change the output (the reference without it differs)
        empty = torch.zeros(attn.num_heads, 0, attn.head_dim)
        assert not torch.allclose(attn(x, causal=causal), explicit_attention(attn, x, empty, empty, causal))


@pytest.mark.parametrize("recipe", ["fusion=prefix(n=4) decoder=ptuning-v2(n=4,cross=true)", "*=prefix(n=3)"])
def test_gradients_reach_only_the_prefix_parameters(recipe):
    model = toy()
    pm = peftmed.apply(model, recipe)
    x = inputs(model)
    pm.train()
    pm(*x).square().mean().backward()
    prompt_ids = {id(p) for m in prompt_modules(pm) for p in m.parameters()}
    for name, p in pm.named_parameters():
        if id(p) in prompt_ids:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    assert pm.num_trainable() == sum(p.numel() for m in prompt_modules(pm) for p in m.parameters())


def train_steps(pm, x, target, steps=12, lr=0.1):
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=lr)
    pm.train()
    losses = []
    for _ in range(steps):
        logits = pm(*x)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("recipe", ["decoder=prefix(n=6)", "fusion=ptuning-v2(n=6) decoder=ptuning-v2(n=6)",
                                    "vision=full fusion=lora(r=8) decoder=prefix(n=10)"])
def test_a_few_training_steps_lower_the_loss(recipe):
    model = toy()
    x = inputs(model, batch=4)
    target = torch.randint(0, model.vocab, x[2].shape, generator=torch.Generator().manual_seed(5))
    pm = peftmed.apply(model, recipe)
    losses = train_steps(pm, x, target)
    assert losses[-1] < 0.95 * losses[0], losses


def test_mixed_families_recipe_reports_each_method():
    model = toy()
    pm = peftmed.apply(model, "vision=full fusion=lora(r=8) decoder=prefix(n=10)")
    report = pm.trainable_report()
    rows = {r.component: (r.method, r.trainable) for r in report.rows}
    h, n, e, layers = 32, 10, 32, 2  # hidden, tokens, mlp_hidden (default: the hidden width), layers
    assert rows["decoder"] == ("prefix", n * h + h * e + e + e * layers * 2 * h + layers * 2 * h)
    assert rows["vision"] == ("full", sum(p.numel() for p in model.vision.parameters()))
    assert rows["fusion"][0] == "lora"
    assert report.row == "T|LoRA|Prefix"
    ptv2 = peftmed.apply(toy(), "decoder=ptv2(n=10,cross=true)").trainable_report()
    assert ptv2.trainable == (2 * layers) * 2 * n * h  # self + cross attention, keys + values


@pytest.mark.parametrize("recipe", ["fusion=prefix(n=4,dropout=0.1) decoder=ptuning-v2(n=3,shared=true)",
                                    "decoder=prefix(n=4,init=zeros)+lora(r=4)"])
def test_save_load_round_trip_gives_identical_outputs(recipe, tmp_path):
    model = toy()
    pm = peftmed.apply(model, recipe)
    randomise_(pm)
    pm.eval()
    x = inputs(model)
    expected = pm(*x)
    pm.save_adapter(tmp_path / "a")
    loaded = peftmed.load_adapter(toy(), tmp_path / "a").eval()
    assert torch.equal(loaded(*x), expected)
    assert set(loaded.adapter_tensors()) == set(pm.adapter_tensors())


def test_fold_keeps_outputs_shrinks_the_adapter_and_reloads(tmp_path):
    model = toy()
    pm = peftmed.apply(model, "fusion=prefix(n=4) decoder=prefix(n=4,shared=true)")
    randomise_(pm)
    pm.eval()
    x = inputs(model)
    with torch.no_grad():
        before = pm(*x)
    count = pm.trainable_report().trainable
    assert fold_prompts(pm) == 2
    with torch.no_grad():
        torch.testing.assert_close(pm(*x), before)
    folded = pm.trainable_report().trainable
    assert folded == 2 * 2 * 4 * 32 + 1 * 2 * 4 * 32  # (layers, 2, n, hidden): fusion 2 layers, decoder shared
    assert folded < count / 10
    pm.save_adapter(tmp_path / "f")
    loaded = peftmed.load_adapter(toy(), tmp_path / "f").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*x), before)
    assert all(m.mlp is None for m in prompt_modules(loaded))


def test_training_path_computes_the_same_prefix_as_the_cached_eval_path():
    pm = peftmed.apply(toy(), "decoder=prefix(n=4)")
    randomise_(pm)
    module = prompt_modules(pm)[0]
    with torch.no_grad():
        cached = [module.prefix(i) for i in range(2)]
    for i in range(2):
        fresh = module.prefix(i)  # grad mode: per-layer slice of the MLP output
        assert fresh[0].requires_grad
        torch.testing.assert_close(fresh[0], cached[i][0])
        torch.testing.assert_close(fresh[1], cached[i][1])
    # a changed parameter invalidates the eval cache
    with torch.no_grad():
        module.embedding.add_(1.0)
        assert not torch.allclose(module.prefix(0)[0], cached[0][0])


def test_init_options():
    zeros = prompt_modules(peftmed.apply(toy(), "decoder=ptuning-v2(n=3,init=zeros)"))[0]
    assert zeros.prompts.abs().sum() == 0
    model = toy()
    pm = peftmed.apply(model, "decoder=ptuning-v2(n=4,init=text,init_token_ids=[5,9])")
    table = model.decoder["embed"].weight
    prompts = prompt_modules(pm)[0].prompts  # (layers, 2, n, hidden)
    expected = table[torch.tensor([5, 9, 5, 9])]
    for layer in range(2):
        for kv in range(2):
            torch.testing.assert_close(prompts[layer, kv], expected)
    model = toy()
    pm = peftmed.apply(model, "fusion=prefix(n=2,init=text,init_token_ids=[7])")
    torch.testing.assert_close(prompt_modules(pm)[0].embedding, model.fusion["embed"].weight[[7, 7]])
    shared = prompt_modules(peftmed.apply(toy(), "decoder=ptuning-v2(n=3,shared=true)"))[0]
    assert shared.prompts.shape == (1, 2, 3, 32)
    assert torch.equal(shared.prefix(0)[0], shared.prefix(1)[0])


def test_adapters_switch_and_disable():
    model = toy()
    x = inputs(model)
    base = model(*x)
    pm = peftmed.apply(model, "decoder=prefix(n=3)", adapter_name="a")
    randomise_(pm, seed=1)
    out_a = pm(*x)
    pm.add_adapter("b", "decoder=ptuning-v2(n=2)")
    randomise_(pm, seed=2)
    out_b = pm(*x)
    assert not torch.allclose(out_a, out_b)
    pm.set_adapter("a")
    assert torch.equal(pm(*x), out_a)
    with pm.disable_adapter():
        assert torch.equal(pm(*x), base)
    pm.remove_adapter("a")
    pm.remove_adapter("b")
    assert all(blk.attn.prefix_provider is None for blk in model.decoder["blocks"])
    assert torch.equal(model(*x), base)


def test_prefix_is_not_recomputed_per_sample_or_copied():
    model = toy()
    pm = peftmed.apply(model, "decoder=prefix(n=3)")
    calls = []
    attn = model.decoder["blocks"][0].attn
    provider = attn.prefix_provider
    attn.prefix_provider = lambda: calls.append(1) or provider()
    pm(*inputs(model, batch=5))
    assert len(calls) == 1  # once per forward for the whole batch, not once per sample
    assert provider()[0].dim() == 3


# ---- bad input ---------------------------------------------------------------------------------------


class PlainAttention(nn.Module):
    """An attention module outside the prefix protocol (and not a transformers type)."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x)[0]


def test_prefix_on_attention_that_cannot_take_one_fails_naming_the_module():
    model = ToyVLM()
    model.decoder["blocks"][0].attn = PlainAttention()
    backbone = peftmed.Backbone("toy-plain", components={"decoder": "decoder"}, roles=TOY_ROLES)
    with pytest.raises(RecipeError, match=r"decoder\.blocks\.0\.attn.*PlainAttention.*cannot take a key/value prefix"):
        peftmed.apply(model, "decoder=prefix(n=2)", backbone=backbone)
    no_roles = peftmed.Backbone("toy-noattn", components={"decoder": "decoder"}, roles={"attn.q": r"\.q$"})
    with pytest.raises(RecipeError, match="finds no attention module"):
        peftmed.apply(ToyVLM(), "decoder=ptuning-v2", backbone=no_roles)


def test_bad_options_and_combinations_are_refused():
    with pytest.raises(RecipeError, match="two prompt-family methods"):
        peftmed.apply(toy(), "decoder=prefix+ptuning-v2")
    with pytest.raises(RecipeError, match="appears twice"):
        peftmed.apply(toy(), "decoder=prefix+prefix")
    with pytest.raises(ConfigError, match="n=3 and num_virtual_tokens=4 disagree"):
        peftmed.apply(toy(), "decoder=prefix(n=3,num_virtual_tokens=4)")
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        peftmed.apply(toy(), "decoder=prefix(n=-1)")
    with pytest.raises(ConfigError, match="init must be one of"):
        peftmed.apply(toy(), "decoder=prefix(init=uniform)")
    with pytest.raises(ConfigError, match="needs init_text"):
        peftmed.apply(toy(), "decoder=ptv2(init=text)")
    with pytest.raises(ConfigError, match=r"not in the vocabulary \(0\.\.63\)"):
        peftmed.apply(toy(), "decoder=ptv2(init=text,init_token_ids=[64])")
    with pytest.raises(ConfigError, match=r"carry a \.tokenizer"):
        peftmed.apply(toy(), "decoder=ptv2(init=text,init_text='no effusion')")
    with pytest.raises(ConfigError, match="mlp_hidden"):
        peftmed.apply(toy(), "decoder=prefix(mlp_hidden=0)")
    wide = prompt_modules(peftmed.apply(toy(), "decoder=prefix(mlp_hidden=48)"))[0]
    assert wide.mlp[0].out_features == 48
    with pytest.raises(peftmed.UnknownNameError, match="num_virtual_tokens"):
        peftmed.apply(toy(), "decoder=prefix(num_virtual_token=3)")


def test_position_limit_is_enforced_where_the_module_declares_one():
    model = toy()
    model.decoder["blocks"][0].attn.max_positions = 8
    with pytest.raises(ConfigError, match=r"num_virtual_tokens=8 is not below the position limit 8 of 'decoder\.blocks\.0\.attn'"):
        peftmed.apply(model, "decoder=ptv2(n=8)")
    peftmed.apply(model, "decoder=ptv2(n=7)")


def test_merge_is_refused_and_recipe_check_runs_on_meta():
    pm = peftmed.apply(toy(), "decoder=prefix(n=2)")
    with pytest.raises(peftmed.PeftmedError, match="cannot be merged"):
        pm.merge()
    with torch.device("meta"):
        meta = peftmed.build_backbone("toy-vlm")
    report = peftmed.apply(meta, "F|Prefix|PTV2", keep_base=False).trainable_report()
    assert report.trainable > 0 and report.row == "F|Prefix|PTV2"
    assert isinstance(prompt_modules(peftmed.apply(toy(), "decoder=prefix"))[0], DeepPrompts)


# ---- miss-tiny (the MISS graph: ViT | JTM | decoder, beam-search answers) --------------------------------


def miss_tiny(seed=0):
    torch.manual_seed(seed)
    return peftmed.build_backbone("miss-tiny").eval()


def test_miss_prefix_on_every_component_trains_and_generates_deterministically():
    model = miss_tiny()
    batch = model.example_batch(batch_size=3, seed=0)
    with torch.no_grad():
        base_loss = model.compute_loss(batch)
    off = peftmed.apply(model, "*=prefix(n=2,cross=true)")
    with torch.no_grad(), off.disable_adapter():
        assert torch.equal(off.compute_loss(batch), base_loss)
    off.remove_adapter("default")

    pm = peftmed.apply(model, "vision=prefix(n=4) fusion=prefix(n=4,cross=true) decoder=ptuning-v2(n=4,init_std=0.5)")
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    losses = []  # eval mode: no dropout, so every step must lower the (label-smoothed) loss
    for _ in range(6):
        loss = pm.compute_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert all(p.grad is None for n, p in model.named_parameters())
    pm.eval()
    beams = pm.generate(batch, max_new_tokens=4, num_beams=3)
    assert pm.generate(batch, max_new_tokens=4, num_beams=3) == beams

    # greedy decoding equals a step-by-step reference that re-runs the decoder on the whole answer so far
    from peftmed.backbones.miss import generation

    with torch.no_grad():
        states, mask = model.encode(batch)
        greedy = generation.beam_search(model, states, mask, num_beams=1, max_new_tokens=4)
        tok = model.tokenizer
        for i, row in enumerate(greedy):
            seq = torch.tensor([[tok.dec_id]])
            expected = []
            for _ in range(4):
                logits = model.text_decoder(seq, None, states[i : i + 1], mask[i : i + 1])[:, -1]
                nxt = int(logits.argmax(-1))
                if nxt == tok.sep_id:
                    break
                expected.append(nxt)
                seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
            assert list(row) == expected
        with pm.disable_adapter():  # the encoder prefixes are not inert: the JTM states change
            assert not torch.allclose(model.encode(batch)[0], states)
