"""The conformance suite every method (and backbone) plugin runs, as pytest test classes.

A plugin author writes, in a test file::

    from peftmed.testing import conformance_tests
    TestDoraConformance = conformance_tests(method_name="dora", options={"r": 4})

and pytest runs every check below on every registered tiny backbone (see ``helpers.is_tiny``), for
each dtype in ``dtypes``. A check that cannot run on a backbone is skipped with the reason (the method
matches no module there, the model gives no example inputs, the method cannot merge...).

What a method promises through its class attributes decides what is checked:
  identity_at_init  the adapted model computes exactly the base model's output before training
                    (default: True for the select family, which only unfreezes, False otherwise);
  mergeable         merge() folds the update into the weights with the same output, unmerge() undoes it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

import pytest
import torch

from ..errors import PeftmedError
from ..kernels.registry import KernelCall
from ..model import apply, load_adapter
from ..recipe import Recipe
from . import helpers as h

_registries: dict[type, object] = {}


def _registry_for(cls: type):
    """One fresh registry per test class (building it loads every plugin, so it is shared by the
    class's tests; tests never register into it)."""
    if cls not in _registries:
        _registries[cls] = h.fresh_registry(getattr(cls, "extra_plugins", ()))
    return _registries[cls]


class MethodConformance:
    """Checks for one method; subclass and set ``method_name`` (or call :func:`conformance_tests`)."""

    method_name: ClassVar[str] = ""
    options: ClassVar[Mapping[str, Any]] = {}
    component: ClassVar[str | None] = None  # None: the first component the method applies to
    dtypes: ClassVar[tuple[str | torch.dtype, ...]] = ("float32",)  # names or torch dtypes
    backbones: ClassVar[tuple[str, ...] | None] = None  # None: every registered tiny backbone
    extra_plugins: ClassVar[tuple[object, ...]] = ()  # plugin objects to register in-process
    seed: ClassVar[int] = 0

    # ---- parametrisation ---------------------------------------------------------------------------
    @classmethod
    def registry(cls):
        return _registry_for(cls)

    def pytest_generate_tests(self, metafunc):
        if "conformance_backbone" in metafunc.fixturenames:
            names = list(self.backbones) if self.backbones is not None else h.tiny_backbones(self.registry())
            metafunc.parametrize("conformance_backbone", names, ids=names)
        if "conformance_dtype" in metafunc.fixturenames:
            # dtypes may be given as names ("float32") or torch dtypes (torch.float32)
            names = [str(d).replace("torch.", "") for d in self.dtypes]
            metafunc.parametrize("conformance_dtype", names, ids=names)

    # ---- shared setup -------------------------------------------------------------------------------
    def _method(self):
        if not self.method_name:
            pytest.fail(f"{type(self).__name__} does not set method_name")
        return self.registry().method(self.method_name)

    def _setup(self, backbone_name: str, dtype_name: str):
        """(registry, backbone, target, base model, inputs, base output) or a skip with the reason."""
        reg = self.registry()
        self._method()
        dtype, device = h.to_dtype(dtype_name), h.test_device()
        backbone = reg.backbone(backbone_name)
        try:
            target = h.find_target(reg, backbone_name, self.method_name, self.options, self.component)
            model = h.build_model(backbone, seed=self.seed, dtype=dtype, device=device)
            inputs = h.example_inputs(model, backbone, dtype=dtype, device=device, seed=self.seed)
        except h.NotApplicable as exc:
            pytest.skip(str(exc))
        with torch.no_grad():
            base_out = h.run(model, inputs).detach().clone()
        pm = apply(model, target.recipe, backbone=backbone, registry=reg)
        return reg, backbone, target, pm, inputs, base_out

    # ---- the checks ---------------------------------------------------------------------------------
    def test_registered_with_valid_config(self):
        method = self._method()
        assert method.family in ("inject", "select", "prompt"), f"family {method.family!r}"
        assert method.name == self.method_name or self.method_name in method.aliases
        config = method.make_config(dict(self.options))
        assert isinstance(config.to_dict(), dict)
        json.dumps(config.to_dict())  # configs are saved in the adapter manifest as JSON
        if method.family == "inject":
            assert method.layer_class is not None, "an inject-family method needs layer_class"

    def test_identity_at_init(self, conformance_backbone, conformance_dtype):
        method = self._method()
        promised = getattr(method, "identity_at_init", None)
        if promised is None:
            promised = method.family == "select"
        if not promised:
            pytest.skip(f"method {method.name!r} does not promise identity at initialisation")
        *_, pm, inputs, base_out = self._setup(conformance_backbone, conformance_dtype)
        with torch.no_grad():
            out = h.run(pm, inputs)
        h.assert_close(out, base_out, f"{method.name} at initialisation vs the base model")

    def test_trained_adapter_changes_output(self, conformance_backbone, conformance_dtype):
        """An adapter whose tensors moved must change the output (a silently inert method fails)."""
        *_, pm, inputs, base_out = self._setup(conformance_backbone, conformance_dtype)
        h.perturb_(pm.adapter_tensors(), seed=self.seed + 1)
        with torch.no_grad():
            out = h.run(pm, inputs)
        assert not torch.allclose(out, base_out), (
            f"method {self.method_name!r}: moving every adapter tensor left the output unchanged "
            f"(the adapter is inert on {conformance_backbone})"
        )
        with pm.disable_adapter(), torch.no_grad():
            h.assert_close(h.run(pm, inputs), base_out, "with the adapter disabled")

    def test_gradients_only_where_intended(self, conformance_backbone, conformance_dtype):
        *_, pm, inputs, _ = self._setup(conformance_backbone, conformance_dtype)
        h.perturb_(pm.adapter_tensors(), seed=self.seed + 1)  # LoRA's A gets no gradient while B = 0
        adapter = pm.adapter_tensors()
        adapter_ids = {id(p) for p in adapter.values()}
        assert all(p.requires_grad for p in adapter.values()), "every adapter tensor must be trainable"
        h.run(pm, inputs).float().pow(2).mean().backward()
        leaked = [n for n, p in pm.named_parameters() if p.grad is not None and id(p) not in adapter_ids]
        assert not leaked, f"parameters outside the adapter received gradients: {leaked[:5]}"
        frozen_trainable = [n for n, p in pm.named_parameters() if p.requires_grad and id(p) not in adapter_ids]
        assert not frozen_trainable, f"parameters outside the adapter are trainable: {frozen_trainable[:5]}"
        reached = [n for n, p in adapter.items() if p.grad is not None and bool(p.grad.abs().sum() > 0)]
        assert reached, f"no adapter tensor of {self.method_name!r} received a gradient"

    def test_save_load_round_trip(self, conformance_backbone, conformance_dtype, tmp_path):
        reg, backbone, _, pm, inputs, _ = self._setup(conformance_backbone, conformance_dtype)
        h.perturb_(pm.adapter_tensors(), seed=self.seed + 1)
        with torch.no_grad():
            expected = h.run(pm, inputs)
        pm.save_adapter(tmp_path / "adapter")
        fresh = h.build_model(backbone, seed=self.seed, dtype=h.to_dtype(conformance_dtype), device=h.test_device())
        loaded = load_adapter(fresh, tmp_path / "adapter", backbone=backbone, registry=reg)
        saved, restored = pm.adapter_tensors(), loaded.adapter_tensors()
        assert sorted(saved) == sorted(restored)
        for name in saved:
            assert torch.equal(saved[name].detach(), restored[name].detach()), f"tensor {name} changed on reload"
        with torch.no_grad():
            h.assert_close(h.run(loaded, inputs), expected, "output after save and load")

    def test_trainable_count_matches_manifest(self, conformance_backbone, conformance_dtype, tmp_path):
        *_, pm, _, _ = self._setup(conformance_backbone, conformance_dtype)
        pm.save_adapter(tmp_path / "adapter")
        manifest = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
        from_shapes = sum(int(torch.Size(m["shape"]).numel()) for m in manifest["tensors"].values())
        trainable = pm.num_trainable()
        assert trainable > 0
        assert manifest["trainable"] == from_shapes == trainable == pm.trainable_report().trainable, (
            f"manifest says {manifest['trainable']} (shapes sum to {from_shapes}), the model trains {trainable}"
        )

    def test_merge_equals_unmerged(self, conformance_backbone, conformance_dtype):
        method = self._method()
        *_, pm, inputs, _ = self._setup(conformance_backbone, conformance_dtype)
        if not method.mergeable:
            if method.family in ("inject", "prompt"):
                with pytest.raises(PeftmedError):
                    pm.merge()
            pytest.skip(f"method {method.name!r} is not mergeable")
        h.perturb_(pm.adapter_tensors(), seed=self.seed + 1)
        with torch.no_grad():
            unmerged = h.run(pm, inputs)
            pm.merge()
            h.assert_close(h.run(pm, inputs), unmerged, "merged vs unmerged output")
            pm.unmerge()
            h.assert_close(h.run(pm, inputs), unmerged, "output after unmerge")


class BackboneConformance:
    """Checks for one backbone plugin; subclass and set ``backbone_name``."""

    backbone_name: ClassVar[str] = ""
    # methods that must apply to at least one component, and run, on every backbone
    probe_methods: ClassVar[tuple[str, ...]] = ("layernorm", "lora(r=2)")
    extra_plugins: ClassVar[tuple[object, ...]] = ()
    seed: ClassVar[int] = 0

    def _backbone(self):
        reg = _registry_for(type(self))
        return reg, reg.backbone(self.backbone_name)

    def pytest_generate_tests(self, metafunc):
        if "probe_method" in metafunc.fixturenames:
            metafunc.parametrize("probe_method", list(self.probe_methods), ids=list(self.probe_methods))

    def test_components_resolve(self):
        _, backbone = self._backbone()
        model = h.build_model(backbone, seed=self.seed)
        assert backbone.components, "a backbone needs at least one component"
        for comp in backbone.components:
            assert backbone.component_module(model, comp) is not None

    def test_every_declared_role_matches(self):
        _, backbone = self._backbone()
        model = h.build_model(backbone, seed=self.seed)
        declared = set(backbone.roles) | {r for t in backbone.component_roles.values() for r in t}
        unmatched = [r for r in sorted(declared) if not any(backbone.match(model, c, r) for c in backbone.components)]
        assert not unmatched, f"roles declared by {backbone.name!r} that match no module: {unmatched}"

    def test_is_tiny_and_runs(self):
        _, backbone = self._backbone()
        tiny, why = h.is_tiny(backbone)
        assert tiny, f"backbone {backbone.name!r} is not tiny: {why}"
        model = h.build_model(backbone, seed=self.seed)
        out = h.run(model, h.example_inputs(model, backbone, dtype=torch.float32, device="cpu"))
        assert torch.isfinite(out).all()

    def test_probe_methods_apply_and_train(self, probe_method):
        reg, backbone = self._backbone()
        call = Recipe.parse(f"*={probe_method}").entries["*"][0]
        comps = []
        for comp in backbone.components:
            try:
                h.find_target(reg, backbone.name, call.name, call.options, comp)
                comps.append(comp)
            except h.NotApplicable:
                continue
        assert comps, f"{probe_method} applies to no component of {backbone.name!r}: check its role map"
        model = h.build_model(backbone, seed=self.seed)
        pm = apply(model, " ".join(f"{c}={probe_method}" for c in comps), backbone=backbone, registry=reg)
        assert pm.num_trainable() > 0
        out = h.run(pm, h.example_inputs(model, backbone, dtype=torch.float32, device="cpu"))
        out.float().pow(2).mean().backward()
        assert any(p.grad is not None for p in pm.adapter_tensors().values())


class RegistrationConformance:
    """Checks for a plugin that registers kernels, datasets or metrics: it loads cleanly in strict
    mode and registers what it says. Subclass and set ``kind`` and ``names``."""

    kind: ClassVar[str] = ""  # "kernel" | "dataset" | "metric" | "method" | "backbone" | "command"
    names: ClassVar[tuple[str, ...]] = ()
    extra_plugins: ClassVar[tuple[object, ...]] = ()

    def test_loads_in_strict_mode(self):
        reg = h.build_registry(extra_plugins=self.extra_plugins, strict=True)
        assert not reg.failed_plugins()

    def test_registers_its_names(self):
        reg = h.fresh_registry(self.extra_plugins)
        for name in self.names:
            assert name in reg.names(self.kind), f"{self.kind} {name!r} is not registered"
            obj = reg.get(self.kind, name)
            assert getattr(obj, "name", None), f"{self.kind} {name!r} has no name"
            if self.kind == "kernel":
                assert getattr(obj, "op", None), f"kernel {name!r} has no op"


class DatasetConformance:
    """Checks for a dataset plugin; subclass and set ``dataset_name`` (and ``data_dir`` if it reads files)."""

    dataset_name: ClassVar[str] = ""
    data_dir: ClassVar[str | None] = None
    options: ClassVar[Mapping[str, Any]] = {}
    extra_plugins: ClassVar[tuple[object, ...]] = ()

    def test_first_split_loads_valid_records(self):
        reg = _registry_for(type(self))
        spec = reg.get("dataset", self.dataset_name)
        assert spec.splits, f"dataset {self.dataset_name!r} declares no splits"
        if spec.needs_data_dir and self.data_dir is None:
            pytest.skip(f"dataset {self.dataset_name!r} reads files; set data_dir on the test class")
        records = spec.load(spec.splits[0], data_dir=self.data_dir, **self.options)
        assert records, f"split {spec.splits[0]!r} of {self.dataset_name!r} is empty"
        qids = [r.qid for r in records]
        assert len(set(qids)) == len(qids), "question ids must be unique (answers are matched by qid)"
        for r in records:
            assert r.answer_type in ("CLOSED", "OPEN"), f"record {r.qid}: answer_type {r.answer_type!r}"
            assert r.question.strip() and str(r.answer).strip(), f"record {r.qid} has an empty question or answer"


class KernelConformance:
    """Checks for a kernel implementation; subclass and set ``op`` and ``impl``. The implementation's
    forward and backward are compared with the op's PyTorch reference on the inputs its reference module
    gives (``peftmed.kernels.<op>.reference.conformance_case``), for every op."""

    op: ClassVar[str] = ""
    impl: ClassVar[str] = ""
    extra_plugins: ClassVar[tuple[object, ...]] = ()

    def _impl(self):
        return _registry_for(type(self)).get("kernel", f"{self.op}:{self.impl}")

    def test_describes_itself(self):
        impl = self._impl()
        ok, why = impl.available()
        assert isinstance(ok, bool) and isinstance(why, str)
        assert ok or why, "an unavailable implementation must say why"
        assert impl.devices and impl.dtypes

    def test_matches_reference(self):
        import importlib

        impl = self._impl()
        ok, why = impl.available()
        if not ok:
            pytest.skip(f"{self.op}:{self.impl} is not available here: {why}")
        if impl.refuses(KernelCall("cpu", torch.float32, explicit=True)) is not None:
            pytest.skip(f"{self.op}:{self.impl} does not run on the CPU in float32 here")
        try:
            ref = importlib.import_module(f"peftmed.kernels.{self.op}.reference")
        except ImportError:
            pytest.skip(f"op {self.op!r} has no reference module in peftmed.kernels (a plugin's own op)")
        if not hasattr(ref, "conformance_case"):
            pytest.fail(f"peftmed.kernels.{self.op}.reference has no conformance_case()")
        fns = impl.load()
        fwd, bwd = ref.conformance_case(torch.Generator().manual_seed(0))
        got, want = fns["forward"](*fwd), ref.forward(*fwd)
        h.assert_close(got[0], want[0], f"{self.op}:{self.impl} forward")
        grads, ref_grads = fns["backward"](*bwd(got)), ref.backward(*bwd(want))
        for i, (g, r) in enumerate(zip(grads, ref_grads)):
            if r is None:
                continue
            assert g is not None, f"{self.op}:{self.impl} backward returned no gradient #{i}"
            h.assert_close(g, r, f"{self.op}:{self.impl} backward gradient #{i}")


def conformance_tests(method_name: str, options: Mapping[str, Any] | None = None, **attributes) -> type:
    """A :class:`MethodConformance` subclass for ``method_name``; bind it to a ``Test*`` name."""
    attrs = {"method_name": method_name, "options": dict(options or {}), **attributes}
    return type(f"Test{method_name.title().replace('-', '')}Conformance", (MethodConformance,), attrs)


def backbone_conformance_tests(backbone_name: str, **attributes) -> type:
    """A :class:`BackboneConformance` subclass for ``backbone_name``; bind it to a ``Test*`` name."""
    attrs = {"backbone_name": backbone_name, **attributes}
    return type(f"Test{backbone_name.title().replace('-', '')}Conformance", (BackboneConformance,), attrs)


def dataset_conformance_tests(dataset_name: str, **attributes) -> type:
    """A :class:`DatasetConformance` subclass for ``dataset_name``; bind it to a ``Test*`` name."""
    attrs = {"dataset_name": dataset_name, **attributes}
    return type(f"Test{dataset_name.title().replace('-', '')}Conformance", (DatasetConformance,), attrs)


def kernel_conformance_tests(op: str, impl: str, **attributes) -> type:
    """A :class:`KernelConformance` subclass for implementation ``impl`` of ``op``."""
    attrs = {"op": op, "impl": impl, **attributes}
    return type(f"Test{op.title().replace('_', '')}{impl.title().replace('-', '')}Conformance",
                (KernelConformance,), attrs)
