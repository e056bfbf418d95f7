"""Building blocks of the conformance kit: tiny backbones, seeded models, inputs, outputs, tolerances.

A backbone is *tiny* (its default build is small enough for a CPU test) when it declares
``tiny=True`` or its name ends in ``-tiny``.

Models give the kit their inputs through ``model.example_inputs(batch=2, seq=6, generator=g)``,
returning a tuple of positional arguments or a dict of keyword arguments (``toy-vlm`` shows how).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import PeftmedError, RecipeError
from ..model import apply
from ..plugins import Registry, build_registry
from ..recipe import MethodCall

# The tolerance tables, every entry (rtol, atol); atol is scaled by the reference's largest magnitude.
# Two computations of one model in one dtype that should agree (identity, merge, reload): float32 leaves
# room for re-association in a merged matmul; half types for their 8/11-bit mantissas.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}
# A kernel implementation in a dtype against the op's fp32 reference (the oracle).
ORACLE_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


class NotApplicable(Exception):
    """A check that cannot run on this backbone, with the reason (the tests skip with it)."""


def fresh_registry(extra_plugins=()) -> Registry:
    """A new plugin manager and registry (built-ins, installed entry points, and ``extra_plugins``)."""
    return build_registry(extra_plugins=tuple(extra_plugins))


def test_device() -> torch.device:
    """The device conformance tests run on: ``PEFTMED_TEST_DEVICE`` (default ``cpu``)."""
    return torch.device(os.environ.get("PEFTMED_TEST_DEVICE", "cpu"))


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise PeftmedError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def is_tiny(backbone) -> tuple[bool, str]:
    """(tiny?, why) for one registered backbone: declared, never measured (measuring means building
    every registered model, base-size ones included, at each test collection)."""
    if getattr(backbone, "tiny", False):
        return True, "it declares tiny=True"
    if backbone.name.endswith("-tiny"):
        return True, "its name ends in -tiny"
    return False, "it neither declares tiny=True nor has a name ending in -tiny"


def tiny_backbones(registry: Registry) -> list[str]:
    """Names of the registered backbones that are tiny, sorted; ``PEFTMED_TEST_BACKBONES=a,b`` keeps
    only those (a plugin author's quick run)."""
    names = [name for name in registry.names("backbone") if is_tiny(registry.backbone(name))[0]]
    wanted = os.environ.get("PEFTMED_TEST_BACKBONES")
    if wanted:
        keep = {w.strip() for w in wanted.split(",") if w.strip()}
        names = [n for n in names if n in keep]
    return names


def build_model(backbone, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> nn.Module:
    """The backbone's default model with seeded random weights, in eval mode (no dropout)."""
    torch.manual_seed(seed)
    model = backbone.build()
    return model.to(device=device, dtype=dtype).eval()


def example_inputs(model: nn.Module, backbone, *, dtype: torch.dtype, device, seed: int = 0):
    """(args, kwargs) for one forward pass, from ``model.example_inputs``; floats cast to ``dtype``."""
    make = getattr(model, "example_inputs", None)
    if make is None:
        raise NotApplicable(
            f"backbone {backbone.name!r} builds a {type(model).__name__} without example_inputs(); give the "
            f"model an example_inputs(batch, seq, generator) method so the kit can run it"
        )
    inputs = make(generator=torch.Generator().manual_seed(seed))
    cast = lambda t: t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
    if isinstance(inputs, Mapping):
        return (), {k: cast(v) if torch.is_tensor(v) else v for k, v in inputs.items()}
    if torch.is_tensor(inputs):
        inputs = (inputs,)
    return tuple(cast(v) if torch.is_tensor(v) else v for v in inputs), {}


def output_tensor(output: Any) -> torch.Tensor:
    """The main floating tensor of a model's output (logits of a ModelOutput, a dict, or a tuple)."""
    if torch.is_tensor(output):
        return output
    for key in ("logits", "logits_per_image"):
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if torch.is_tensor(value):
            return value
    items = output.values() if isinstance(output, Mapping) else output
    if isinstance(output, (Mapping, tuple, list)):
        for value in items:
            if torch.is_tensor(value) and value.is_floating_point():
                return value
    raise PeftmedError(f"cannot find an output tensor in a {type(output).__name__}")


def run(model: nn.Module, inputs) -> torch.Tensor:
    args, kwargs = inputs
    return output_tensor(model(*args, **kwargs))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    rtol, atol = TOLERANCES.get(expected.dtype, TOLERANCES[torch.float32])
    # scale atol by the output's magnitude so a large logit scale does not make a tight check flaky
    atol = atol * max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@dataclass
class Target:
    """Where a method is tested on one backbone: the component and the recipe text."""

    backbone: str
    component: str
    recipe: str


def method_recipe(method_name: str, options: Mapping[str, Any], component: str) -> str:
    return f"{component}={MethodCall(method_name, dict(options)).to_text()}"


def find_target(registry: Registry, backbone_name: str, method_name: str, options: Mapping[str, Any],
                component: str | None = None) -> Target:
    """The first component of the backbone the method applies to (or ``component`` when given)."""
    backbone = registry.backbone(backbone_name)
    candidates = [component] if component else list(backbone.components)
    reasons = []
    for comp in candidates:
        recipe = method_recipe(method_name, options, comp)
        try:
            with torch.device("meta"):
                model = backbone.build()
            apply(model, recipe, backbone=backbone, registry=registry, keep_base=False)
        except RecipeError as exc:
            reasons.append(f"{comp}: {exc}")
            continue
        return Target(backbone_name, comp, recipe)
    raise NotApplicable(
        f"method {method_name!r} applies to no component of backbone {backbone_name!r}: " + " | ".join(reasons)
    )


def perturb_(tensors: Mapping[str, torch.Tensor], *, seed: int = 0, scale: float = 0.05) -> None:
    """Move every adapter tensor away from its initial value (seeded), so checks are not trivially
    true for updates that start at zero (LoRA's B)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(tensors):
            t = tensors[name]
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32) * scale
            t.add_(noise.to(device=t.device, dtype=t.dtype))
