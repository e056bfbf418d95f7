"""Run a peftmed recipe through huggingface/peft on the same model, for the bench's baseline rows.

The target modules come from the backbone's role map (``backbone.match(model, component, role)`` over
the roles the peftmed method would use), so both libraries touch exactly the same modules. peft
implements LoRA, IA3, LayerNorm-tuning (``LNTuningConfig``), Prefix-tuning and P-Tuning; a component
trained fully (``T``) next to them becomes peft's ``modules_to_save``. Recipes with no peft
equivalent (FFN-, Attention-tuning, BitFit alone) get no baseline row; where peft itself fails on the
model (e.g. prompt learning on a model that is not a transformers LM), the error is peft's own and
the bench records it in the row.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..errors import ConfigError, PeftmedError
from ..interop.peft_format import import_peft
from ..recipe import Recipe

# What a method is in peft is the method's declaration (Method.peft, a PeftForm). Prompt forms go through peft's
# get_peft_model, the others through inject_adapter_in_model (which keeps our model class, so compute_loss and
# generate still work).


class PeftUnavailable(PeftmedError):
    """peft is not installed, or has no equivalent of this recipe."""


def peft_version() -> str | None:
    """The installed peft's version, read from its metadata (importing peft takes seconds), or None."""
    import importlib.metadata

    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return None


def _canonical(registry, name: str) -> str:
    return registry.method(name).name


def _saved_whole(registry, name: str) -> bool:
    """Whether peft keeps a component this method trains as one of ``modules_to_save`` (full tuning)."""
    form = registry.method(name).peft
    return form is not None and form.modules_to_save


def peft_equivalent(recipe: Recipe, backbone, registry) -> str | None:
    """Why peft has no equivalent of ``recipe`` (None when it has one)."""
    resolved = recipe.trained(backbone.components, registry)
    if not resolved:
        return "nothing is trained"
    tuned = set()
    for component, calls in resolved.items():
        names = [_canonical(registry, c.name) for c in calls]
        if len(names) == 1 and _saved_whole(registry, names[0]):
            continue  # becomes modules_to_save
        if len(names) > 1:
            return f"peft cannot combine {'+'.join(names)} on one component"
        if registry.method(names[0]).peft is None:
            return f"peft has no {names[0]!r} method"
        tuned.add(names[0])
    if not tuned:
        return "peft has no full fine-tuning method (it is plain training)"
    if len(tuned) > 1:
        return f"peft applies one method per model; this recipe uses {sorted(tuned)}"
    return None


def _targets(model: nn.Module, backbone, registry, component: str, call, form) -> tuple[list[str], dict, dict]:
    """Module names the peftmed method would touch in ``component``, the method's config of each (as a dict) and
    the facts its peft form reads of each (``role_subsets``: e.g. IA3's feed-forward modules)."""
    method = registry.method(call.name)
    config = method.make_config(call.options)
    names: list[str] = []
    info: dict[str, dict] = {}
    subsets = {fact: set(getattr(config, option, ()) or ()) for option, fact in form.role_subsets.items()}
    for role in method.roles_for(config):
        for name in backbone.match(model, component, role):
            if name not in names:
                names.append(name)
            facts = info.setdefault(name, {fact: False for fact in subsets})
            for fact, roles in subsets.items():
                facts[fact] = facts[fact] or role in roles
    return names, {n: config.to_dict() for n in names}, info


def apply_peft(model: nn.Module, recipe: Recipe | str | Mapping, backbone, registry) -> nn.Module:
    """Apply ``recipe`` to ``model`` through peft; returns the model to train (ours, or peft's wrapper).

    Only the adapter's parameters (and ``modules_to_save``) are left trainable. Raises
    ``PeftUnavailable`` when peft is missing or has no equivalent; peft's own errors propagate.
    """
    if peft_version() is None:
        raise PeftUnavailable("huggingface/peft is not installed (pip install peftmed[baseline])")
    peft = import_peft()

    recipe = Recipe.parse(recipe, components=list(backbone.components))
    reason = peft_equivalent(recipe, backbone, registry)
    if reason:
        raise PeftUnavailable(reason)
    resolved = recipe.trained(backbone.components, registry)
    full = [path for c, calls in resolved.items() if _saved_whole(registry, calls[0].name)
            for path in backbone.component_paths(c)]
    tuned = {c: calls[0] for c, calls in resolved.items() if not _saved_whole(registry, calls[0].name)}
    method = _canonical(registry, next(iter(tuned.values())).name)
    form = registry.method(method).peft
    options = [dict(c.options) for c in tuned.values()]
    if any(o != options[0] for o in options):
        raise PeftUnavailable(f"peft takes one {method} config per model; this recipe gives {options}")
    if "" in full:  # the whole model is one component: nothing left for peft to do
        raise PeftUnavailable("the fully trained component is the whole model")
    for p in model.parameters():
        p.requires_grad_(False)

    if form.prompt:
        config = registry.method(method).make_config(options[0]).to_dict()
        return _apply_prompt(peft, model, method, form, config, full)
    targets, configs, info = [], {}, {}
    for component, call in tuned.items():
        names, cfgs, facts = _targets(model, backbone, registry, component, call, form)
        targets += names
        configs.update(cfgs)
        info.update(facts)
    if not targets:
        raise PeftUnavailable(f"the role map gives no {method} target modules in {sorted(tuned)}")
    try:
        fields = form.fields(configs, info)
    except ConfigError as exc:
        raise PeftUnavailable(str(exc)) from None
    config = peft.get_peft_config({"peft_type": form.peft_type, "target_modules": targets,
                                   "modules_to_save": full or None, **fields})
    model = peft.inject_adapter_in_model(config, model)
    # inject_adapter_in_model leaves modules_to_save copies trainable; make sure nothing else is
    for name, p in model.named_parameters():
        p.requires_grad_(_is_peft_trainable(name, form))
    return model


def parameter_methods(recipe: Recipe, backbone, registry):
    """``method_of(parameter name of the peft-wrapped model) -> peftmed Method`` it stands for: the fully
    trained components (peft's ``modules_to_save``) -> the full-tuning method, the rest -> the tuned one."""
    resolved = recipe.trained(backbone.components, registry)
    methods = [registry.method(c.name) for calls in resolved.values() for c in calls]
    full = next((m for m in methods if _saved_whole(registry, m.name)), None)
    tuned = next((m for m in methods if not _saved_whole(registry, m.name)), full)

    def method_of(name: str):
        return full if full is not None and "modules_to_save." in name else tuned

    return method_of


def _is_peft_trainable(name: str, form) -> bool:
    if "modules_to_save." in name:
        return True
    if "original_module." in name:
        return False
    return any(m in name for m in form.trainable)


def _apply_prompt(peft, model: nn.Module, method: str, form, config: dict, full: list[str]) -> nn.Module:
    """Prefix / P-Tuning through peft's PeftModel; peft requires a transformers-style LM for these."""
    if getattr(model, "config", None) is None:
        raise PeftUnavailable(f"peft's {method} feeds virtual tokens to a whole transformers language model "
                              f"(past_key_values); this {type(model).__name__} holds it inside a VQA wrapper, "
                              f"and peft has no per-component prefix")
    if full:
        raise PeftUnavailable("peft prompt learning with fully trained components is not supported here")
    return peft.get_peft_model(model, peft.get_peft_config({"peft_type": form.peft_type,
                                                             **form.config({"": config}, {})}))
