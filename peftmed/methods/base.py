"""What a method is, and how the core applies each family.

A method is a named strategy with a config dataclass and a family:

- ``inject``: wraps the modules of its roles in an :class:`AdapterLayer` that holds new parameters
  (LoRA, IA3). It provides ``layer_class``.
- ``select``: unfreezes existing parameters (LayerNorm-, FFN-, Attention-tuning, BitFit, full). It
  provides ``select(ctx) -> {name: Parameter}``.
- ``prompt``: adds learned key/value prefixes to attention (Prefix, P-Tuning v2). It provides
  ``attach(ctx) -> PromptModule``.

The core dispatches on the family, never on a method's name; a third-party method subclasses
:class:`Method`, sets ``name`` and ``family``, and registers an instance through the
``register_methods`` hook.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, NoMatchError, PeftmedError, UnknownNameError
from ..roles import ROLES

log = logging.getLogger("peftmed.methods")

FAMILIES = ("inject", "select", "prompt")


@dataclass
class MethodConfig:
    """Options every method has. Subclasses add theirs, each with a comment, and check them in
    ``validate`` (called at construction)."""

    roles: tuple[str, ...] | None = None  # roles to touch; None = the method's defaults
    lr: float | None = None  # learning rate of this method's tensors (None: the run's --lr)
    weight_decay: float | None = None  # AdamW weight decay of its matrices (None: the run's --weight-decay)

    def __post_init__(self):
        if self.roles is not None:
            if isinstance(self.roles, str):
                self.roles = tuple(r for r in self.roles.replace("+", ",").split(",") if r)
            self.roles = tuple(self.roles)
            if not self.roles:
                raise ConfigError("roles=[] selects nothing; leave it out to use the method's defaults")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got lr={self.lr!r}")
        if self.weight_decay is not None and not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"weight_decay must be a non-negative number, got weight_decay={self.weight_decay!r}")
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the bad value and the valid range."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass(frozen=True)
class PeftForm:
    """What a method is in huggingface/peft's adapter format, declared by the method itself (``Method.peft``;
    None: peft has no equivalent), so that exporting, importing and the bench's peft baseline branch on no
    method's name and a plugin method crosses to peft as the built-ins do. Nothing here imports peft: the config
    is the fields of peft's ``adapter_config.json``.

    A module's tensors are ``<module>.<attribute>`` in peftmed and ``<module>.<suffix>`` in peft.

    - ``peft_type``: peft's name of the method (``adapter_config.json``'s ``peft_type``, e.g. ``"LORA"``);
    - ``tensors``: {peftmed attribute: peft suffix}, e.g. ``{"lora_A": "lora_A.weight"}``;
    - ``trainable``: parts of the names of what trains in a model peft adapted (the baseline unfreezes those);
    - ``config(configs, info)``: peft's config fields besides ``peft_type`` and ``target_modules``, from
      ``configs`` {module: the method's config of its component, as a dict} and ``info`` {module: facts of
      the module, see ``info``}; raises ConfigError for what peft's config cannot say;
    - ``info(layer, config, peft_config, module)``: the facts of one module, from its peftmed layer (export:
      ``peft_config`` None) or from peft's config (import: ``layer`` None), e.g. IA3's ``feedforward``;
    - ``to_peft(attribute, tensor, info)`` / ``from_peft(attribute, tensor, info)``: layout changes;
    - ``options(peft_config, infos)``: one component's recipe options from the infos of its modules;
    - ``role_subsets``: {recipe option: key of ``info``}: the option lists the roles of the modules whose
      fact is true (IA3's ``feedforward_roles``), ``["none"]`` when none;
    - ``prompt``: peft applies it to a whole language model (``get_peft_model``), not per module; such an adapter
      is not exported (``refusal`` says why);
    - ``modules_to_save``: a component it trains is, in peft, one of ``modules_to_save`` (full tuning) beside
      another method's adapter; it has no adapter of its own (not exported: ``refusal``);
    - ``selects``: peft config fields, with their values, that tell this form from another of the same
      ``peft_type`` (LoRA ``{"use_dora": False}``, the DoRA plugin ``{"use_dora": True}``): written into every
      config (:meth:`fields`) and matched on import (a field a config lacks counts as False).
    """

    peft_type: str
    tensors: Mapping[str, str] = field(default_factory=dict)
    trainable: tuple[str, ...] = ()
    config: typing.Callable[[dict, dict], dict] = lambda configs, info: {}
    info: typing.Callable[..., dict] = lambda layer, config, peft_config, module: {}
    to_peft: typing.Callable[[str, torch.Tensor, dict], torch.Tensor] = lambda attribute, tensor, info: tensor
    from_peft: typing.Callable[[str, torch.Tensor, dict], torch.Tensor] = lambda attribute, tensor, info: tensor
    options: typing.Callable[[dict, list], dict] = lambda peft_config, infos: {}
    role_subsets: Mapping[str, str] = field(default_factory=dict)
    prompt: bool = False
    modules_to_save: bool = False
    refusal: str = ""
    selects: Mapping[str, Any] = field(default_factory=dict)

    @property
    def adapter(self) -> bool:
        """Whether peft holds it as an adapter of its own, per module (what export and import take): not a prompt
        peft applies to a whole language model, not a component kept whole as ``modules_to_save``."""
        return not self.prompt and not self.modules_to_save

    def fields(self, configs: dict, info: dict) -> dict:
        """peft's config fields besides ``peft_type`` and ``target_modules``: ``config``'s and ``selects``."""
        return {**self.config(configs, info), **self.selects}

    def selected_by(self, peft_config: Mapping[str, Any]) -> bool:
        """Whether a peft ``adapter_config.json`` of this form's type is this form (its ``selects`` all hold)."""
        return all(peft_config.get(key, False) == value for key, value in self.selects.items())


def peft_targets(spec, name: str) -> bool:
    """Whether peft's ``target_modules`` / ``feedforward_modules`` value selects module ``name``: a string is a
    regular expression matched against the whole name, a list names modules by their last dotted parts."""
    import re

    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def pattern_value(patterns, name: str, default):
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching the end of ``name``."""
    import re

    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


class Method:
    """Base class of all methods. Subclasses set the class attributes and the family's hook."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    default_roles: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    short_label: ClassVar[str] = ""  # how the papers' rows write it, e.g. "LoRA"
    mergeable: ClassVar[bool] = False
    trains_nothing: ClassVar[bool] = False  # the method leaves its component frozen (frozen, F): skipped
    default_lr: ClassVar[float | None] = None  # its usual learning rate (the bench's default without --lr)
    version: ClassVar[str] = "1"
    peft: ClassVar[PeftForm | None] = None  # its form in huggingface/peft's format; None: peft has none

    # inject family
    layer_class: ClassVar[type[AdapterLayer] | None] = None

    def layer_class_for(self, module: nn.Module) -> type[AdapterLayer] | None:
        """The AdapterLayer class that wraps ``module`` (inject family): ``layer_class`` unless a method wraps
        several kinds of module (LoRA: linear layers and convolutions)."""
        return self.layer_class

    def __init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"method {self.name!r} has family {self.family!r}; expected one of {FAMILIES}")
        if not self.short_label:
            type(self).short_label = self.name

    def __repr__(self) -> str:
        return f"<method {self.name} ({self.family})>"

    # ---- configs -----------------------------------------------------------------------------------
    def make_config(self, options: Mapping[str, Any] | None = None, *, lenient: bool = False) -> MethodConfig:
        """Build and validate a config from recipe options.

        Unknown options raise (listing the valid ones, suggesting the closest); with ``lenient``
        (adapters written by a newer version) they are dropped with a warning.
        """
        options = dict(options or {})
        cls = self.config_class
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        kwargs = {}
        for key, value in options.items():
            if key not in names:
                if lenient:
                    warnings.warn(
                        f"method {self.name!r}: ignoring unknown option {key!r}={value!r} "
                        f"(written by a newer version?)",
                        stacklevel=2,
                    )
                    continue
                raise UnknownNameError("option", key, names, where=f"for method {self.name!r}")
            kwargs[key] = _coerce(self.name, key, value, hints.get(key, Any))
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"method {self.name!r}: {exc}") from None

    def roles_for(self, config: MethodConfig) -> tuple[str, ...]:
        return tuple(config.roles) if config.roles else tuple(self.default_roles)

    # ---- families (override the one of your family) ------------------------------------------------
    def select(self, ctx: ApplyContext) -> dict[str, nn.Parameter]:
        """select family: the parameters to unfreeze, keyed by model-level parameter name."""
        raise NotImplementedError(f"{self.name} is not a select-family method")

    def extra_parameters(self, ctx: ApplyContext, layers: Mapping[str, AdapterLayer]) -> dict[str, nn.Parameter]:
        """inject family: existing base parameters to train as well (e.g. LoRA's bias option)."""
        return {}

    def attach(self, ctx: ApplyContext) -> PromptModule:
        """prompt family: build the prompt module and hook it into the component's attention."""
        raise NotImplementedError(f"{self.name} is not a prompt-family method")


@dataclass
class ApplyContext:
    """What a method sees when it is applied to one component."""

    model: nn.Module  # the base model (already wrapped by earlier methods/adapters)
    backbone: Any  # peftmed.backbones.Backbone
    component: str
    method: Method
    config: MethodConfig
    adapter_name: str
    registry: Any = None  # the registry the model is applied with (kernels dispatch through it)
    unreachable: tuple[str, ...] = ()  # module names whose outputs never reach the loss (Backbone.unused)
    skipped: dict[str, int] = field(default_factory=dict)  # parts left out (they cannot learn) -> parameters
    _cache: dict = field(default_factory=dict, repr=False)

    def cannot_learn(self, name: str) -> str | None:
        """The part of the model (one of ``unreachable``) that module or parameter ``name`` sits in, whose
        outputs never reach the loss; None when it does reach it."""
        return next((u for u in self.unreachable if name == u or name.startswith(u + ".")), None)

    def _skip(self, part: str, count: int) -> None:
        self.skipped[part] = self.skipped.get(part, 0) + count

    @property
    def component_module(self) -> nn.Module:
        return self.backbone.component_module(self.model, self.component)

    @property
    def component_path(self) -> str:
        return self.backbone.component_paths(self.component)[0]

    def base_parameters(self) -> dict[str, nn.Parameter]:
        """The model's own parameters in this component (adapters' excluded), by canonical name."""
        out: dict[str, nn.Parameter] = {}
        for path, root in self.backbone.component_roots(self.model, self.component):
            for n, p in base_named_parameters(root):
                name = canonical_name(f"{path}.{n}" if path else n)
                part = self.cannot_learn(name)
                if part is not None:
                    self._skip(part, p.numel())
                    continue
                out[name] = p
        return out

    def roles(self) -> tuple[str, ...]:
        return self.method.roles_for(self.config)

    def match(self, role: str) -> dict[str, nn.Module]:
        """The modules of ``role`` in this component; those whose outputs never reach the loss are left out
        (and recorded in ``skipped``)."""
        found = {}
        for name, module in self.backbone.match(self.model, self.component, role).items():
            part = self.cannot_learn(canonical_name(name))
            if part is not None:
                self._skip(part, sum(p.numel() for p in module.parameters()))
                continue
            found[name] = module
        return found

    def matched(self, *, require: bool = True) -> dict[str, tuple[nn.Module, str]]:
        """name -> (module, role) over this method's roles; raises if nothing matches."""
        found: dict[str, tuple[nn.Module, str]] = {}
        known = set(self.backbone.declared_roles(self.component))

        for role in self.roles():
            if role not in known and role not in ROLES:
                raise UnknownNameError("role", role, known | set(ROLES), where=f"in component {self.component!r}")
        for role in self.roles():
            for name, module in self.match(role).items():
                found.setdefault(name, (module, role))
        if require and not found:
            why = (f"; {len(self.skipped)} module(s) of those roles feed nothing the loss sees "
                   f"({next(iter(self.skipped))}...)" if self.skipped else "")
            raise NoMatchError(
                f"method {self.method.name!r} on component {self.component!r} of backbone "
                f"{self.backbone.name!r} matches no module: it asks for roles {list(self.roles())}, "
                f"and this component has none of them (its roles: "
                f"{', '.join(self.available_roles()) or 'none'}){why}. Pass roles=[...] to choose others."
            )
        return found

    def available_roles(self) -> list[str]:
        return [r for r in self.backbone.declared_roles(self.component) if self.match(r)]


class AdapterLayer(nn.Module):
    """Wraps a base module and holds per-adapter parameters (inject family).

    The base class owns the bookkeeping (which adapters exist, which is active, which are merged, removing
    one); a method's layer implements only what is its own:

    - ``add_adapter(name, config, role)``: create the adapter's tensors in the ``nn.ParameterDict``
      attributes named in ``adapter_attributes`` (those are what is trained, counted and saved), and
      record ``self.configs[name] = config`` and ``self.roles[name] = role``;
    - ``forward(x)``: ``self.uses(name)`` says whether the active adapter applies (active, present, not
      merged, not disabled); the wrapped module is ``self.base_layer`` (``self.innermost`` below any other
      wrapper);
    - merging, when the method is ``mergeable``: ``delta_weight(name)`` for an additive update of the base
      weight (LoRA, VeRA), or ``merge_into(name, base)`` / ``unmerge_from(name, base)`` for anything else
      (IA3 scales, DoRA renormalises);
    - per-adapter values kept outside the ParameterDicts (dicts keyed by adapter name) are listed in
      ``adapter_side_tables`` so that removing an adapter removes them too.
    """

    adapter_attributes: ClassVar[tuple[str, ...]] = ()
    adapter_side_tables: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self.configs: dict[str, MethodConfig] = {}
        self.roles: dict[str, str] = {}
        self.disabled = False
        # the registry of the PeftModel this layer belongs to: kernel ops dispatch through it
        object.__setattr__(self, "kernel_registry", None)

    # what a method implements ---------------------------------------------------------------------
    def add_adapter(self, name: str, config: MethodConfig, role: str) -> None:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """The additive update of the base weight (out, in) that merging adds (LoRA: s B A)."""
        raise NotImplementedError(f"{type(self).__name__} cannot merge (it has no delta_weight)")

    def merge_into(self, name: str, base: nn.Module) -> None:
        """Fold adapter ``name`` into ``base``'s weights (default: add ``delta_weight``)."""
        base.weight += self.delta_weight(name).to(base.weight.dtype)

    def unmerge_from(self, name: str, base: nn.Module) -> None:
        """Undo ``merge_into`` (default: subtract ``delta_weight``)."""
        base.weight -= self.delta_weight(name).to(base.weight.dtype)

    # the bookkeeping ------------------------------------------------------------------------------
    def merge(self, name: str | None = None) -> None:
        """Fold adapter ``name`` (default: the active one) into the base weights; a no-op when merged."""
        name = name or self.active_adapter
        if name is None or name in self.merged_adapters:
            return
        if name not in self.configs:
            raise UnknownNameError("adapter", name, self.configs, where=f"in {type(self).__name__}")
        base = self.mergeable_base()
        with torch.no_grad():
            self.merge_into(name, base)
        self.merged_adapters.append(name)

    def unmerge(self, name: str | None = None) -> None:
        """Take adapter ``name`` (default: the last merged) back out of the base weights."""
        name = name or (self.merged_adapters[-1] if self.merged_adapters else None)
        if name is None or name not in self.merged_adapters:
            return
        base = self.mergeable_base()
        with torch.no_grad():
            self.unmerge_from(name, base)
        self.merged_adapters.remove(name)

    @property
    def adapters(self) -> list[str]:
        return list(self.configs)

    def uses(self, name: str | None) -> bool:
        """Whether this layer applies adapter ``name`` now (active, present, not merged)."""
        return (
            not self.disabled and name is not None and name == self.active_adapter
            and name in self.configs and name not in self.merged_adapters
        )

    def adapter_state(self, name: str) -> dict[str, nn.Parameter]:
        return {attr: getattr(self, attr)[name] for attr in self.adapter_attributes if name in getattr(self, attr)}

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name``: unmerged first if merged, then its tensors and every side table's entry."""
        if name in self.merged_adapters:
            self.unmerge(name)
        for attr in self.adapter_attributes:
            store = getattr(self, attr)
            if name in store:
                del store[name]
        for attr in self.adapter_side_tables:
            getattr(self, attr).pop(name, None)
        self.configs.pop(name, None)
        self.roles.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active(self, name: str | None) -> None:
        self.active_adapter = name if name in self.configs else None

    @property
    def weight(self) -> torch.Tensor:  # code that reads .weight of the original module keeps working
        return self.base_layer.weight

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    @property
    def innermost(self) -> nn.Module:
        """The original module under every wrapper (LoRA over IA3 over nn.Linear -> the nn.Linear)."""
        return unwrap(self.base_layer)

    @property
    def quantized(self) -> bool:
        """Whether the original module holds 4-bit weights (``--quantize nf4``): its forward is the only
        way to use them (no fused kernel reads them, nothing merges into them)."""
        return is_quantized(self.innermost)

    def mergeable_base(self) -> nn.Module:
        """The base module a merge writes into; merging is exact only directly over the original one."""
        if self.quantized:
            raise PeftmedError(
                f"cannot merge {type(self).__name__} into a 4-bit base layer: its weights are quantized (NF4), "
                f"and adding the update would re-quantize it and lose it. Load the adapter onto a bf16 or fp32 "
                f"base and merge there")
        if isinstance(self.base_layer, AdapterLayer):
            raise PeftmedError(
                f"cannot merge {type(self).__name__} stacked over {type(self.base_layer).__name__} "
                f"(two inject methods on one module); run unmerged or merge a single method"
            )
        return self.base_layer


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a 4-bit linear layer (bitsandbytes ``Linear4bit`` or a subclass)."""
    return any(c.__name__ == "Linear4bit" for c in type(module).__mro__)


def logical_numel(p: torch.Tensor) -> int:
    """How many weights a parameter holds: a 4-bit parameter packs two per byte, and ``numel`` counts bytes."""
    state = getattr(p, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return p.numel()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an adapter computes in: autocast's when autocast is on for ``x``'s device (custom kernels
    are not autocast by torch), else ``x``'s own."""
    kind = x.device.type
    if kind == "meta" or not x.is_floating_point():  # no autocast on the meta device (shape-only runs)
        return x.dtype
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class PromptModule(nn.Module):
    """What a prompt-family method attaches: holds the prompt parameters of one component."""

    def set_active(self, active: bool) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        """Remove the hooks this module put into the model's attention."""
        raise NotImplementedError

    def fold(self) -> None:  # optional: fold a reparameterisation away after training
        """Replace the reparameterisation network by the prefixes it produces (no-op by default)."""


def adapter_parameter_ids(root: nn.Module) -> set[int]:
    """ids of the parameters that adapters added under ``root`` (not the model's own)."""
    ids: set[int] = set()
    for m in root.modules():
        if isinstance(m, AdapterLayer):
            for attr in m.adapter_attributes:
                ids.update(id(p) for p in getattr(m, attr).parameters())
        elif isinstance(m, PromptModule):
            ids.update(id(p) for p in m.parameters())
    return ids


def base_named_parameters(root: nn.Module):
    """(name, parameter) of the model's own parameters under ``root``, adapters' excluded."""
    skip = adapter_parameter_ids(root)
    for n, p in root.named_parameters():
        if id(p) not in skip:
            yield n, p


def unwrap(module: nn.Module) -> nn.Module:
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module


def canonical_name(name: str) -> str:
    """A parameter or module name with adapter wrappers removed (stable across wrapping)."""
    return name.replace(".base_layer", "")


def _coerce(method: str, key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(method, key, value, a)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"method {method!r}: bad value {key}={value!r}")
    if hint is Any or hint is None:
        return value
    if origin in (tuple, list) or hint in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.replace("+", ",").split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"method {method!r}: option {key} expects a list, got {value!r}")
        inner = [a for a in args if a is not Ellipsis]
        if len(inner) == 1:  # tuple[str, ...]: every item of that type
            return tuple(_coerce(method, f"{key}[{i}]", v, inner[0]) for i, v in enumerate(value))
        return tuple(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
            return value.lower() in {"true", "1", "yes"}
        raise ConfigError(f"method {method!r}: option {key} expects true or false, got {value!r}")
    if hint is int:
        # a float (8.0, 1e9) is refused rather than truncated: the user wrote something else than a count
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"method {method!r}: option {key} expects an integer, got {value!r}"
                              + (" (a float; write it without a decimal point or exponent)"
                                 if isinstance(value, float) else ""))
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"method {method!r}: option {key} expects a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"method {method!r}: option {key} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"method {method!r}: option {key} expects text, got {value!r}")
        return value
    return value
