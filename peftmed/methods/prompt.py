"""Prompt-family methods: ``prefix`` (Prefix-tuning) and ``ptuning-v2`` (deep prompts).

Both give every attention layer of a component ``n`` learned key/value vectors that every query
attends to before the sequence (Li & Liang 2021; Liu et al. 2022). They differ in where the
vectors come from:

- ``ptuning-v2``: the key/value vectors are the parameters themselves, ``(layers, 2, n, hidden)``.
- ``prefix``: a reparameterisation MLP produces them from ``n`` learned embeddings,
  ``embedding (n, hidden) -> Linear(hidden, mlp_hidden) -> tanh -> Linear(mlp_hidden, layers*2*hidden)``,
  which stabilises training; after training, :meth:`PrefixPrompts.fold` replaces the MLP by the
  prefixes it produces (outputs unchanged, far fewer parameters to ship).

The attention modules are the ones the backbone's role map calls ``self_attention`` (and
``cross_attention`` with ``cross=true``). A module either follows peftmed's prefix protocol
(peftmed.attention) or the backbone supplies a prefix-capable stand-in for it
(``Backbone.prefix_wrapper``: the transformers backbones wrap their attention classes); anything else
is refused at apply time, naming the module, so a prefix is never silently inert.
The prefix is held once, (H, n, D), and broadcast over the batch and beams.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import PrefixKV
from ..errors import ConfigError, RecipeError
from ..hookspecs import hookimpl
from .base import ApplyContext, Method, MethodConfig, PeftForm, PromptModule

INITS = ("normal", "zeros", "text")


@dataclass
class PromptConfig(MethodConfig):
    num_virtual_tokens: int = 10  # n: prefix length per attention layer (recipes may write n=10)
    shared: bool = False  # one prefix shared by every layer of the component instead of one per layer
    cross: bool = False  # also prefix the cross-attention layers (role cross_attention)
    init: str = "normal"  # normal (N(0, init_std)) | zeros | text (word embeddings of init_text / init_token_ids)
    init_std: float = 0.02  # std of the normal init
    init_text: str | None = None  # with init=text: text tokenised by the model's .tokenizer
    init_token_ids: tuple[int, ...] | None = None  # with init=text: token ids (cycled to fill n)
    dropout: float = 0.0  # dropout on the prefix keys/values while training, in [0, 1)

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens (n) must be a positive integer (a prefix of {self.num_virtual_tokens} "
                              f"tokens would train nothing), got n={self.num_virtual_tokens}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got init={self.init!r}")
        if self.init_std <= 0:
            raise ConfigError(f"init_std must be > 0, got init_std={self.init_std}")
        if self.init == "text" and not self.init_text and not self.init_token_ids:
            raise ConfigError("init=text needs init_text='...' or init_token_ids=[...]")
        if self.init != "text" and (self.init_text or self.init_token_ids):
            raise ConfigError(f"init_text / init_token_ids are used only with init=text, not init={self.init!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got dropout={self.dropout}")


@dataclass
class PrefixConfig(PromptConfig):
    init_std: float = 1.0  # std of the normal init of the MLP's input embeddings (as nn.Embedding)
    mlp_hidden: int | None = None  # hidden width of the reparameterisation MLP; None: the attention width
    folded: bool = False  # set by fold(): the MLP was replaced by the prefixes it produced

    def validate(self) -> None:
        super().validate()
        if self.mlp_hidden is not None and self.mlp_hidden <= 0:
            raise ConfigError(f"mlp_hidden must be a positive integer, got mlp_hidden={self.mlp_hidden}")


# ---- finding the attention modules ------------------------------------------------------------------


def _capable(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("num_heads", "head_dim", "prefix_provider"))


def _is_wrapper(module: nn.Module) -> bool:
    """A stand-in a backbone's prefix_wrapper put in place (it can be taken out again)."""
    return hasattr(module, "prefix_users") and callable(getattr(module, "restore", None))


def _prefixable(backbone, model: nn.Module, name: str, module: nn.Module) -> tuple[str, nn.Module] | None:
    """The (name, module) that takes the prefix for the matched ``module``: itself if it follows the
    protocol, the backbone's prefix-capable stand-in put in its place, or that of its one wrappable child
    (a role map may name an attention block rather than its core, e.g. ``attention`` for ``attention.self``)."""
    if _capable(module):
        return name, module
    wrapper = backbone.wrap_for_prefix(module)
    if wrapper is not None:
        model.set_submodule(name, wrapper)
        return name, wrapper
    kids = [(f"{name}.{n}", c) for n, c in module.named_children()
            if _capable(c) or backbone.wrap_for_prefix(c) is not None]
    if len(kids) == 1:
        return _prefixable(backbone, model, *kids[0])
    return None


def find_attention(ctx: ApplyContext) -> list[tuple[str, nn.Module]]:
    """The prefix-capable attention modules of the component, wrapping transformers ones as needed."""
    roles = ctx.roles()
    if getattr(ctx.config, "cross", False) and "cross_attention" not in roles:
        roles = (*roles, "cross_attention")
    matched: dict[str, nn.Module] = {}
    for role in roles:
        for name, module in ctx.match(role).items():
            matched.setdefault(name, module)
    if not matched:
        raise RecipeError(
            f"method {ctx.method.name!r} on component {ctx.component!r} of backbone {ctx.backbone.name!r} "
            f"finds no attention module: it asks for roles {list(roles)} and the role map names none in "
            f"this component (roles it has: {', '.join(ctx.available_roles()) or 'none'})"
        )
    names = sorted(matched)
    # a role pattern may hit both an attention block and its core child: keep the outer one
    names = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    found = []
    for name in names:
        module = matched[name]
        hit = _prefixable(ctx.backbone, ctx.model, name, module)
        if hit is None:
            raise RecipeError(
                f"method {ctx.method.name!r}: attention module {name!r} ({type(module).__name__}) of component "
                f"{ctx.component!r} cannot take a key/value prefix: it neither follows peftmed's prefix "
                f"protocol (num_heads, head_dim, prefix_provider; see peftmed.attention) nor can backbone "
                f"{ctx.backbone.name!r} wrap it (its prefix_wrapper)"
            )
        found.append(hit)
    return found


# ---- the prompt module ------------------------------------------------------------------------------


class DeepPrompts(PromptModule):
    """Per-layer (or shared) key/value prefixes of one component, hooked into its attention modules.

    Parameters: ``prompts`` (L, 2, n, hidden) for P-Tuning v2 and folded Prefix-tuning; ``embedding``
    (n, hidden) + ``mlp`` for Prefix-tuning before folding. L is 1 when ``shared``.
    """

    def __init__(self, config: PromptConfig, targets: list[tuple[str, nn.Module]], model: nn.Module,
                 heads: int, head_dim: int, *, reparameterise: bool, device=None, dtype=None, registry=None):
        super().__init__()
        self.config = config
        self.heads, self.head_dim, self.hidden = heads, head_dim, heads * head_dim
        self.n = config.num_virtual_tokens
        self.layers = 1 if config.shared else len(targets)
        self.target_names = [name for name, _ in targets]
        # plain attributes, not submodules: the model's parameters must not be counted or saved twice
        object.__setattr__(self, "_targets", [m for _, m in targets])
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_cache", {})
        object.__setattr__(self, "_registry", registry)
        self.active = False
        factory = {"device": device, "dtype": dtype}
        self.prompts: nn.Parameter | None = None
        self.embedding: nn.Parameter | None = None
        self.mlp: nn.Sequential | None = None
        if reparameterise and not getattr(config, "folded", False):
            width = config.mlp_hidden or self.hidden
            self.embedding = nn.Parameter(torch.empty(self.n, self.hidden, **factory))
            self.mlp = nn.Sequential(
                nn.Linear(self.hidden, width, **factory), nn.Tanh(),
                nn.Linear(width, self.layers * 2 * self.hidden, **factory),
            )
        else:
            self.prompts = nn.Parameter(torch.empty(self.layers, 2, self.n, self.hidden, **factory))
        self._providers = [self._provider(i) for i in range(len(targets))]
        for module in self._targets:
            if _is_wrapper(module):
                module.prefix_users.add(id(self))

    # ---- initialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def initialise(self, word_embeddings: torch.Tensor | None = None) -> None:
        """Fill the parameters as config.init says (``word_embeddings``: (n, hidden) for init=text)."""
        cfg = self.config
        tensor = self.embedding if self.embedding is not None else self.prompts
        if cfg.init == "zeros":
            tensor.zero_()
            if self.mlp is not None:  # zero output layer: the prefixes start at exactly zero
                self.mlp[2].weight.zero_()
                self.mlp[2].bias.zero_()
        elif cfg.init == "normal":
            tensor.normal_(0.0, cfg.init_std)
        elif word_embeddings is not None:  # text; a meta-device build has no values to copy
            if self.embedding is not None:
                self.embedding.copy_(word_embeddings)
            else:
                self.prompts.copy_(word_embeddings.expand_as(self.prompts))

    # ---- the prefixes ----------------------------------------------------------------------------
    def _all_kv(self) -> torch.Tensor:
        """(L, 2, n, hidden) for every layer at once."""
        if self.prompts is not None:
            return self.prompts
        out = self.mlp(self.embedding)  # (n, L*2*hidden)
        return out.view(self.n, self.layers, 2, self.hidden).permute(1, 2, 0, 3)

    def _layer_kv(self, i: int) -> torch.Tensor:
        """(2, n, hidden) of layer i; with the MLP, only the rows of its output that layer i uses."""
        j = 0 if self.config.shared else i
        if self.prompts is not None:
            return self.prompts[j]
        if not torch.is_grad_enabled():  # generation/eval: one MLP pass, reused until a parameter changes
            key = tuple(p._version for p in self.parameters()) + (id(self.embedding),)
            cached = self._cache.get("kv")
            if cached is None or cached[0] != key:
                cached = (key, self._all_kv())
                self._cache["kv"] = cached
            return cached[1][j]
        # training: compute per layer, so no autograd graph is shared between forward passes
        hid = self.mlp[1](self.mlp[0](self.embedding))  # (n, mlp_hidden)
        rows = slice(j * 2 * self.hidden, (j + 1) * 2 * self.hidden)
        out = F.linear(hid, self.mlp[2].weight[rows], self.mlp[2].bias[rows])  # (n, 2*hidden)
        return out.view(self.n, 2, self.hidden).transpose(0, 1)

    def prefix(self, i: int) -> PrefixKV:
        """(prefix_k, prefix_v) of attention module i, each (H, n, D), with the model's kernel registry."""
        kv = self._layer_kv(i)
        if self.config.dropout > 0 and self.training:
            kv = F.dropout(kv, self.config.dropout, training=True)
        kv = kv.view(2, self.n, self.heads, self.head_dim).transpose(1, 2)  # (2, H, n, D)
        return PrefixKV(kv[0], kv[1], self._registry)

    def _provider(self, i: int):
        def provide():
            return self.prefix(i)

        return provide

    # ---- PromptModule -------------------------------------------------------------------------------
    def set_active(self, active: bool) -> None:
        self.active = bool(active) and self.n > 0
        for module, provider in zip(self._targets, self._providers):
            if self.active:
                module.prefix_provider = provider
            elif module.prefix_provider is provider:
                module.prefix_provider = None

    def detach(self) -> None:
        self.set_active(False)
        for name, module in zip(self.target_names, self._targets):
            if _is_wrapper(module):
                module.prefix_users.discard(id(self))
                if not module.prefix_users and self._model.get_submodule(name) is module:
                    self._model.set_submodule(name, module.restore())

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the reparameterisation MLP by the prefixes it produces (call after training)."""
        if self.mlp is None:
            return
        requires_grad = self.embedding.requires_grad
        was_training = self.training
        self.eval()  # the MLP has no dropout, but keep fold() a pure function of the weights
        kv = self._all_kv().detach().clone()
        self.train(was_training)
        self.mlp, self.embedding = None, None
        self.prompts = nn.Parameter(kv, requires_grad=requires_grad)
        self._cache.clear()
        if hasattr(self.config, "folded"):
            self.config.folded = True  # the saved manifest then rebuilds the folded form on load

    def extra_repr(self) -> str:
        form = "prompts" if self.prompts is not None else f"mlp_hidden={self.mlp[0].out_features}"
        return (f"n={self.n}, layers={len(self._targets)}{' (shared)' if self.config.shared else ''}, "
                f"heads={self.heads}, head_dim={self.head_dim}, {form}")


# ---- the methods --------------------------------------------------------------------------------------


class _PromptMethod(Method):
    family = "prompt"
    default_roles = ("self_attention",)
    reparameterise = False
    option_aliases: dict[str, str] = {"n": "num_virtual_tokens"}

    def make_config(self, options: Mapping[str, Any] | None = None, *, lenient: bool = False) -> MethodConfig:
        options = dict(options or {})
        for alias, name in self.option_aliases.items():
            if alias in options:
                if name in options and options[name] != options[alias]:
                    raise ConfigError(
                        f"method {self.name!r}: {alias}={options[alias]!r} and {name}={options[name]!r} "
                        f"disagree; give one of them"
                    )
                options[name] = options.pop(alias)
        return super().make_config(options, lenient=lenient)

    def attach(self, ctx: ApplyContext) -> PromptModule:
        targets = find_attention(ctx)
        try:
            return self._attach(ctx, targets)
        except Exception:  # leave the model as it was: put back the wrappers no adapter uses
            for name, module in targets:
                if _is_wrapper(module) and not module.prefix_users:
                    ctx.model.set_submodule(name, module.restore())
            raise

    def _attach(self, ctx: ApplyContext, targets: list[tuple[str, nn.Module]]) -> PromptModule:
        cfg: PromptConfig = ctx.config
        shapes = {(m.num_heads, m.head_dim) for _, m in targets}
        if len(shapes) > 1:
            detail = ", ".join(f"{n} ({m.num_heads}x{m.head_dim})" for n, m in targets)
            raise RecipeError(
                f"method {self.name!r} on component {ctx.component!r}: its attention modules differ in "
                f"heads x head_dim ({detail}); apply it to a component whose attention layers agree"
            )
        heads, head_dim = shapes.pop()
        for name, module in targets:
            limit = getattr(module, "max_positions", None)
            if limit is not None and cfg.num_virtual_tokens >= limit:
                raise ConfigError(
                    f"method {self.name!r}: num_virtual_tokens={cfg.num_virtual_tokens} is not below the "
                    f"position limit {limit} of {name!r}; a prefix that long leaves the model no context. "
                    f"Use fewer virtual tokens (the papers use 10-100)"
                )
        ref = next(ctx.component_module.parameters(), None)
        module = DeepPrompts(cfg, targets, ctx.model, heads, head_dim, reparameterise=self.reparameterise,
                             device=ref.device if ref is not None else None,
                             dtype=torch.float64 if ref is not None and ref.dtype == torch.float64 else None,  # fp32
                             registry=ctx.registry)
        try:
            module.initialise(_word_embeddings(ctx, cfg, heads * head_dim) if cfg.init == "text" else None)
        except Exception:
            module.detach()
            raise
        return module


PEFT_REFUSAL = ("peft's prompt learning feeds past_key_values to a whole transformers language model, not to one "
                "component's attention")


def _peft_prompt_config(configs: dict, info: dict) -> dict:
    cfg = next(iter(configs.values()), {})
    return {"task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": int(cfg.get("num_virtual_tokens", 10))}


class Prefix(_PromptMethod):
    name = "prefix"
    config_class = PrefixConfig
    reparameterise = True
    aliases = ("prefix-tuning",)
    description = "Prefix-tuning: learned key/value prefixes per attention layer, via a foldable MLP"
    short_label = "Prefix"
    default_lr = 3e-3
    peft = PeftForm("PREFIX_TUNING", config=_peft_prompt_config, prompt=True, refusal=PEFT_REFUSAL)


class PTuningV2(_PromptMethod):
    name = "ptuning-v2"
    config_class = PromptConfig
    aliases = ("ptv2", "p-tuning-v2", "p-tuning")
    description = "P-Tuning v2: learned key/value prefixes (deep prompts) per attention layer"
    short_label = "PTV2"
    default_lr = 3e-3
    peft = PeftForm("P_TUNING", config=_peft_prompt_config, prompt=True, refusal=PEFT_REFUSAL)


def _word_embeddings(ctx: ApplyContext, cfg: PromptConfig, hidden: int) -> torch.Tensor | None:
    """(n, hidden) rows of the component's word embedding for init=text (token ids cycled to fill n)."""
    embeds = [m for m in ctx.match("embed").values() if isinstance(m, nn.Embedding)] or [
        m for m in ctx.model.modules() if isinstance(m, nn.Embedding)]
    embeds = [m for m in embeds if m.embedding_dim == hidden]
    if not embeds:
        raise ConfigError(
            f"method {ctx.method.name!r}: init=text needs a word embedding of width {hidden} (the attention "
            f"width of component {ctx.component!r}); the model has none. Use init=normal or init=zeros"
        )
    table = max(embeds, key=lambda m: m.num_embeddings)  # the word embedding, not a type/position one
    ids = list(cfg.init_token_ids or ())
    if not ids:
        tokenizer = getattr(ctx.model, "tokenizer", None)
        if tokenizer is None:
            raise ConfigError(
                f"method {ctx.method.name!r}: init_text={cfg.init_text!r} needs the model to carry a "
                f".tokenizer; pass init_token_ids=[...] instead"
            )
        encoded = tokenizer.encode(cfg.init_text)
        ids = list(getattr(encoded, "ids", encoded))
    bad = [i for i in ids if not 0 <= int(i) < table.num_embeddings]
    if not ids or bad:
        raise ConfigError(
            f"method {ctx.method.name!r}: init token ids {bad or ids} are not in the vocabulary "
            f"(0..{table.num_embeddings - 1})"
        )
    if cfg.num_virtual_tokens == 0 or table.weight.is_meta:
        return None
    index = torch.tensor([int(ids[i % len(ids)]) for i in range(cfg.num_virtual_tokens)], device=table.weight.device)
    return table.weight.detach()[index]


def fold_prompts(model: nn.Module) -> int:
    """Fold every Prefix-tuning MLP of a PeftModel (or any module tree); returns how many were folded."""
    count = 0
    for module in model.modules():
        if isinstance(module, DeepPrompts) and module.mlp is not None:
            module.fold()
            count += 1
    return count


@hookimpl
def register_methods(register):
    register(Prefix())
    register(PTuningV2())
