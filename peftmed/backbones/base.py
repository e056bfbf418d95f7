"""Backbones: an architecture's components and its role map.

A backbone maps each component (``vision``, ``fusion``, ``decoder``, ``projector``, ``llm``) to a
module path in the model, and each role (a kind of module: ``attn.q``, ``mlp.up``, ``norm``...) to
patterns over module names. Methods ask for roles, never for module names, so one role map per
backbone replaces a method x architecture table.

Role patterns are regular expressions searched (``re.search``) in a module's dotted name relative to
its component's root (e.g. ``layers.3.attn.q``), or callables ``(name, module) -> bool``.

For a model of your own, write a role map in a few lines::

    bb = peftmed.Backbone(
        name="my-vlm",
        components={"vision": "image_encoder", "decoder": "text_decoder"},
        roles={"attn.q": r"\\.q_proj$", "attn.v": r"\\.v_proj$", "mlp.up": r"\\.fc1$",
               "mlp.down": r"\\.fc2$"},          # norm and bias are inferred when not given
    )
    model = peftmed.apply(my_model, "vision=layernorm decoder=lora(r=8)", backbone=bb)
"""

from __future__ import annotations

import inspect

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from torch import nn

from ..errors import PeftmedError, UnknownNameError
from ..roles import COMPONENTS, ROLES  # noqa: F401  (re-exported)

Pattern = Union[str, Callable[[str, nn.Module], bool]]


@dataclass
class TextLimits:
    """How long a generated text a VQA model can take: what a task generating long texts (report
    generation) needs to know. Models return it from ``text_limits(prompt)``.

    ``owner.attr`` is the model's answer-length setting (in tokens, ``specials`` of which are special
    tokens such as [DEC] and [SEP]); ``room`` is the most text tokens its position embeddings hold after
    ``prompt`` (None: unknown); ``hint`` says how to get more room.
    """

    owner: Any
    attr: str
    specials: int
    room: int | None
    hint: str


def _check_options(fn, options: dict, kind: str, skip: int = 0) -> None:
    """An option ``fn`` does not take is named with the ones it takes (a builder with ``**kwargs`` takes any)."""
    try:
        params = list(inspect.signature(fn).parameters.values())[skip:]
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    known = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for name in options:
        if name not in known:
            raise UnknownNameError(kind, name, known)


def _is_norm(name: str, module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith(
        ("LayerNorm", "RMSNorm", "Norm")
    ) and any(True for _ in module.parameters(recurse=False))


def _is_embedding(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding)


# Roles inferred for any model whose role map does not name them.
INFERRED_ROLES: dict[str, tuple[Pattern, ...]] = {
    "norm": (_is_norm,),
    "embed": (_is_embedding,),
}


@dataclass
class Backbone:
    """An architecture's components and role map, plus (optionally) how to build and load it.

    Fields:
      name: what ``--backbone`` takes.
      components: component -> dotted module path in the model ("" is the whole model), or a tuple
        of paths when a component spans several modules (e.g. ("model.language_model", "lm_head")).
      roles: role -> pattern(s) for all components.
      component_roles: component -> {role -> pattern(s)}, overriding ``roles`` for that component.
      builder: ``builder(**options) -> nn.Module`` building a fresh model (random init).
      loader: ``loader(path, **options) -> nn.Module`` loading a real checkpoint folder.
      prefix_wrapper: ``prefix_wrapper(attention_module) -> module | None``: for an attention module that does
        not follow the prefix protocol of ``peftmed.attention`` (``num_heads``, ``head_dim``,
        ``prefix_provider``), a prefix-capable stand-in to put in its place (with ``prefix_users`` and
        ``restore()``), or None when the backbone cannot wrap it. The prompt-family methods call it.
      tokenizer_loader: ``tokenizer_loader(folder) -> tokenizer`` reading a tokenizer the model saved
        (a run folder's ``tokenizer/``); the builder takes it back as ``tokenizer=``. Files on disk never
        name the class to load: this registered function is the only reader.
      description: one line for ``peftmed backbones``.
      tasks: tasks the built model serves (``"vqa"``, ``"report"``): the capability a task asks for.
      task_options: task -> builder options the backbone needs for that task unless the user sets them
        (e.g. more text positions to hold a whole report).
      defaults: options passed to builder unless overridden.
      depth_options: builder option -> the components whose layer stacks it sizes (e.g. ``{"text_layers":
        ("fusion", "decoder")}``): how ``peftmed plan`` builds shallower copies of the model to measure the
        activation memory a layer adds.
      width_option: a builder option dividing every width of the model by an integer (the heads kept): how
        ``peftmed plan`` measures the activations of a large model quickly (two narrow copies, extrapolated to
        the real width: activations are a width-proportional part plus a part that does not depend on it).
      unused: ``unused(model) -> module names`` whose outputs never reach the loss (e.g. LLaVA takes its image
        features from the vision tower's second-to-last layer, so the last layer and the final norm feed
        nothing): methods skip them, since nothing placed there could receive a gradient, and the trainable
        report says how many parameters were skipped.
    """

    name: str
    components: Mapping[str, str | tuple[str, ...]]
    roles: Mapping[str, Pattern | Iterable[Pattern]] = field(default_factory=dict)
    component_roles: Mapping[str, Mapping[str, Pattern | Iterable[Pattern]]] = field(default_factory=dict)
    builder: Callable[..., nn.Module] | None = None
    loader: Callable[..., nn.Module] | None = None
    prefix_wrapper: Callable[[nn.Module], nn.Module | None] | None = None
    tokenizer_loader: Callable[[Any], Any] | None = None
    description: str = ""
    tasks: tuple[str, ...] = ()
    task_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    depth_options: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    unused: Callable[[nn.Module], Iterable[str]] | None = None
    width_option: str | None = None
    tiny: bool = False  # its default build is small enough for CPU tests (the conformance kit runs on it)

    def __post_init__(self):
        for comp in self.component_roles:
            if comp not in self.components:
                raise PeftmedError(
                    f"backbone {self.name!r}: component_roles names {comp!r}, which is not one of its "
                    f"components {sorted(self.components)}"
                )

    # ---- building --------------------------------------------------------------------------------
    def build(self, **options) -> nn.Module:
        if self.builder is None:
            raise PeftmedError(
                f"backbone {self.name!r} has no builder; pass your own model to peftmed.apply(model, ...)"
            )
        options = {**self.defaults, **options}
        _check_options(self.builder, options, f"build option of backbone {self.name!r}")
        return self._tag(self.builder(**options))

    def from_pretrained(self, path, **options) -> nn.Module:
        if self.loader is None:
            raise PeftmedError(f"backbone {self.name!r} cannot load checkpoints (it has no loader)")
        options = {**self.defaults, **options}
        _check_options(self.loader, options, f"load option of backbone {self.name!r}", skip=1)
        return self._tag(self.loader(path, **options))

    def wrap_for_prefix(self, module: nn.Module) -> nn.Module | None:
        """A prefix-capable stand-in for ``module`` (see ``prefix_wrapper``), or None."""
        return self.prefix_wrapper(module) if self.prefix_wrapper is not None else None

    def load_tokenizer(self, folder) -> Any:
        """The tokenizer saved in ``folder`` by a model of this backbone (see ``tokenizer_loader``)."""
        if self.tokenizer_loader is None:
            raise PeftmedError(f"backbone {self.name!r} has no tokenizer_loader, so the tokenizer saved in "
                               f"{str(folder)!r} cannot be read back")
        return self.tokenizer_loader(folder)

    def _tag(self, model: nn.Module) -> nn.Module:
        """Remember the backbone on the model, so peftmed.apply(model, recipe) needs no backbone=."""
        model.peftmed_backbone = self.name
        return model

    # ---- components and roles ----------------------------------------------------------------------
    def check_component(self, component: str) -> None:
        if component not in self.components:
            raise UnknownNameError(
                "component", component, self.components, hint=f"(backbone {self.name!r})"
            )

    def component_paths(self, component: str) -> tuple[str, ...]:
        """The module path(s) of a component; a component may span several (e.g. an LLM and its head)."""
        self.check_component(component)
        paths = self.components[component]
        return (paths,) if isinstance(paths, str) else tuple(paths)

    def component_roots(self, model: nn.Module, component: str) -> list[tuple[str, nn.Module]]:
        """(path, module) for each module the component is made of."""
        roots = []
        for path in self.component_paths(component):
            try:
                roots.append((path, model.get_submodule(path) if path else model))
            except AttributeError as exc:
                raise PeftmedError(
                    f"backbone {self.name!r} maps component {component!r} to {path!r}, which is not a "
                    f"module of this {type(model).__name__}"
                ) from exc
        return roots

    def component_module(self, model: nn.Module, component: str) -> nn.Module:
        """The component's (first) root module."""
        return self.component_roots(model, component)[0][1]

    def role_patterns(self, component: str, role: str) -> tuple[Pattern, ...]:
        table = self.component_roles.get(component, {})
        pats = table.get(role, self.roles.get(role))
        if pats is None:
            pats = INFERRED_ROLES.get(role, ())
        if isinstance(pats, str) or callable(pats):
            return (pats,)
        return tuple(pats)

    def declared_roles(self, component: str) -> list[str]:
        names = set(self.roles) | set(self.component_roles.get(component, {})) | set(INFERRED_ROLES)
        return sorted(names)

    def match(self, model: nn.Module, component: str, role: str) -> dict[str, nn.Module]:
        """Modules of ``component`` playing ``role``, keyed by their name relative to the model root."""
        patterns = self.role_patterns(component, role)
        found: dict[str, nn.Module] = {}
        for prefix, root in self.component_roots(model, component):
            for rel, module in root.named_modules():
                if ".base_layer" in f".{rel}" or (not rel and not prefix):
                    continue  # adapter wrappers keep the original module at <name>.base_layer
                # a root that is itself a leaf of the component (e.g. an LM head) goes by its own name
                name = rel or prefix.rsplit(".", 1)[-1]
                if any(_pattern_hits(p, name, module) for p in patterns):
                    found[f"{prefix}.{rel}" if rel else prefix] = module
        return found

    def component_of(self, name: str) -> str | None:
        """The component a model-level parameter or module name belongs to (longest path wins)."""
        best, best_len = None, -1
        for comp in self.components:
            for path in self.component_paths(comp):
                if path == "" or name == path or name.startswith(path + "."):
                    if len(path) > best_len:
                        best, best_len = comp, len(path)
        return best


def _pattern_hits(pattern: Pattern, name: str, module: nn.Module) -> bool:
    if callable(pattern):
        return bool(pattern(name, module))
    return re.search(pattern, name) is not None
