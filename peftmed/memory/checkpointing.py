"""Gradient checkpointing per component (``--grad-checkpoint vision,llm`` or ``all``).

Each block of a checkpointed component (a transformer layer) keeps only its input during the forward
pass and recomputes its activations in the backward pass: activation memory drops from one set per
layer to one layer's worth, for about one more forward pass of compute.

The blocks are the backbone's ``block`` role when its role map names one, else the layers of the
component's layer stack (its largest ``nn.ModuleList`` of identical modules: ``blocks`` of a ViT,
``encoder.layer`` of a BERT, ``layers`` of a LLaMA).

Checkpointing is torch's non-reentrant variant. The reentrant one is the classic trap of adapters in a
frozen tower: when a block's input does not require a gradient (pixels through a frozen patch embedding),
it returns no gradient for the LoRA weights inside the block, and they silently stop training. The
non-reentrant variant tracks the parameters used inside, and it saves and restores the random state, so
dropout masks (LoRA dropout included, whose seeds come from torch's generator) repeat exactly.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError, UnknownNameError


def parse_components(value, components, flag: str = "--grad-checkpoint") -> tuple[str, ...]:
    """``"vision,llm"`` / ``"all"`` / a list -> the component names, each checked against ``components``."""
    if value is None or value is False or value == "" or value == ():
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(v).strip() for v in items if str(v).strip()]
    if names in (["all"], ["*"], ["true"], ["True"]):
        return tuple(components)
    if names in (["none"], ["false"], ["False"]):
        return ()
    for name in names:
        if name not in components:
            raise UnknownNameError("component", name, list(components) + ["all"], hint=f"({flag})")
    return tuple(dict.fromkeys(names))


def _layer_stack(root: nn.Module) -> list[nn.Module]:
    best: list[nn.Module] = []
    best_size = 0
    for module in root.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        kinds = {type(m) for m in module}
        if len(kinds) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = list(module), size
    return best


def component_blocks(peft_model, component: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of the blocks of ``component`` that checkpointing wraps."""
    backbone = peft_model.backbone
    model = peft_model.base_model
    if "block" in backbone.declared_roles(component) and backbone.role_patterns(component, "block"):
        return sorted(backbone.match(model, component, "block").items())
    found: list[tuple[str, nn.Module]] = []
    names = {id(m): n for n, m in model.named_modules()}
    for _, root in backbone.component_roots(model, component):
        found += [(names[id(m)], m) for m in _layer_stack(root)]
    return found


def _checkpointed(forward, module: nn.Module):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
        return forward(*args, **kwargs)

    return run


def enable_checkpointing(peft_model, components) -> dict[str, int]:
    """Checkpoint every block of ``components`` (names, ``"all"`` or a comma list); returns blocks per
    component. A component named without a layer stack is an error naming it (``all`` skips those)."""
    every = isinstance(components, str) and components.strip() in ("all", "*", "true", "True")
    wanted = parse_components(components, list(peft_model.backbone.components))
    done: dict[str, int] = {}
    for component in wanted:
        blocks = component_blocks(peft_model, component)
        if not blocks and every:  # "all": the components that have layers (a projector has none)
            continue
        if not blocks:
            raise ConfigError(f"--grad-checkpoint {component}: component {component!r} of backbone "
                              f"{peft_model.backbone.name!r} has no stack of layers to checkpoint (no 'block' role "
                              f"and no nn.ModuleList of identical layers)")
        for _, block in blocks:
            if getattr(block, "peftmed_checkpointed", False):
                continue
            block.forward = _checkpointed(block.forward, block)  # an instance attribute: the class is untouched
            block.peftmed_checkpointed = True
        done[component] = len(blocks)
    return done


def disable_checkpointing(model: nn.Module) -> None:
    """Undo :func:`enable_checkpointing` on every block of ``model``."""
    for module in model.modules():
        if getattr(module, "peftmed_checkpointed", False):
            del module.forward
            module.peftmed_checkpointed = False
