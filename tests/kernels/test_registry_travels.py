"""Kernel dispatch goes through the registry a model was applied with: an implementation registered only in
that registry is the one its layers call, and the process-wide default registry never sees it."""

import importlib

import pytest
import torch

import peftmed
from peftmed.hookspecs import hookimpl
from peftmed.kernels.registry import KernelImpl, clear_cache

FLOATS = (torch.float32, torch.float64)


class CountingKernels:
    """A plugin registering a counting copy of each op's torch reference, above every built-in priority."""

    def __init__(self):
        self.calls = {"lora_linear": 0, "layer_norm": 0, "prefix_attention": 0}

    def _loader(self, op):
        def load():
            ref = importlib.import_module(f"peftmed.kernels.{op}.reference")

            def forward(*args):
                self.calls[op] += 1
                return ref.forward(*args)

            return {"forward": forward, "backward": ref.backward}

        return load

    @hookimpl
    def register_kernels(self, register):
        for op in self.calls:
            register(KernelImpl(op, "counting", 1000, ("cpu",), FLOATS, loader=self._loader(op)))


@pytest.fixture
def counting():
    clear_cache()
    plugin = CountingKernels()
    yield plugin, peftmed.build_registry(extra_plugins=[plugin], load_entrypoints=False)
    clear_cache()


@pytest.mark.parametrize("recipe, op", [("fusion=lora(r=2)", "lora_linear"), ("decoder=layernorm", "layer_norm"),
                                        ("fusion=prefix(n=2)", "prefix_attention")])
def test_the_registry_passed_to_apply_is_the_one_dispatched_through(counting, recipe, op):
    plugin, registry = counting
    torch.manual_seed(0)
    model = peftmed.build_backbone("toy-vlm")
    inputs = model.example_inputs()
    pm = peftmed.apply(model, recipe, registry=registry)
    out = pm(*inputs)
    out.float().sum().backward()
    assert plugin.calls[op] > 0, f"{op}: the model's registry was not used"

    # a model applied with the default registry never calls the plugin's implementation
    before = dict(plugin.calls)
    torch.manual_seed(0)
    other = peftmed.build_backbone("toy-vlm")
    peftmed.apply(other, recipe)(*other.example_inputs())
    assert plugin.calls == before


@pytest.mark.parametrize("recipe, op", [("fusion=lora(r=2)", "lora_linear"), ("decoder=layernorm", "layer_norm"),
                                        ("fusion=prefix(n=2)", "prefix_attention")])
def test_a_compiled_model_dispatches_through_its_own_registry_too(counting, recipe, op):
    """Under torch.compile the custom ops used to resolve through the default registry: a kernel registered only
    in the model's registry was never called (and one named explicitly failed with an unknown name)."""
    plugin, registry = counting
    torch.manual_seed(0)
    model = peftmed.build_backbone("toy-vlm")
    inputs = model.example_inputs()
    pm = peftmed.apply(model, recipe, registry=registry)
    eager = pm(*inputs)
    calls = plugin.calls[op]
    torch._dynamo.reset()
    compiled = torch.compile(pm, backend="eager", fullgraph=False)
    out = compiled(*inputs)
    out.float().sum().backward()
    assert plugin.calls[op] > calls, f"{op}: the compiled model did not call its registry's kernel"
    torch.testing.assert_close(out, eager)
    assert all(p.grad is not None for p in pm.adapter_tensors().values())
