"""Dispatch: auto picks and falls back, explicit names work or raise saying why, environment
overrides, plugins add implementations, build failures, `peftmed kernels`, torch.compile."""

from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest
import torch

import peftmed.plugins as plugins
from peftmed import kernels
from peftmed.errors import UnknownNameError
from peftmed.hookspecs import hookimpl
from peftmed.kernels import build
from peftmed.kernels.lora_linear import reference as lora_ref
from peftmed.kernels.registry import KernelImpl, KernelUnavailableError


def _lora_args(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(5, 16, generator=g).to(dtype), torch.randn(8, 16, generator=g).to(dtype), None,
            torch.randn(2, 16, generator=g).to(dtype), torch.randn(8, 2, generator=g).to(dtype), 0.5)


def test_auto_picks_the_measured_faster_implementation_on_cpu(cpp_built, fresh_dispatch):
    # benchmarks/kernels/README.md: the C++ LoRA wins with and without dropout; native LayerNorm wins
    assert kernels.resolve("lora_linear", "auto", "cpu", torch.float32, 8)[0].name == "cpp"
    assert kernels.resolve("layer_norm", None, "cpu", torch.bfloat16, 768)[0].name == "torch"
    assert kernels.resolve("layer_norm", "cpp", "cpu", torch.bfloat16, 768)[0].name == "cpp"


def test_unsupported_dtype_auto_falls_back_explicit_raises(cpp_built, fresh_dispatch):
    assert kernels.resolve("layer_norm", "auto", "cpu", torch.float64, 8)[0].name == "torch"
    with pytest.raises(KernelUnavailableError, match="does not support dtype float64"):
        kernels.resolve("layer_norm", "cpp", "cpu", torch.float64, 8)
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(kernels.layer_norm(x, torch.ones(8, dtype=torch.float64),
                                                  torch.zeros(8, dtype=torch.float64)),
                               torch.nn.functional.layer_norm(x, (8,)))


def test_explicit_wrong_device_and_unknown_name(fresh_dispatch, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelUnavailableError, match=r"lora_linear:cuda .*runs on cuda, not cpu"):
        kernels.resolve("lora_linear", "cuda", "cpu", torch.float32, 8)
    with pytest.raises(KernelUnavailableError, match="triton.*CPU only interpreted.*TRITON_INTERPRET=1.*auto"):
        kernels.resolve("layer_norm", "triton", "cpu", torch.float32, 8)
    with pytest.raises(UnknownNameError, match="'tritn'.*did you mean 'triton'"):
        kernels.resolve("layer_norm", "tritn", "cpu", torch.float32, 8)


def test_environment_overrides_auto_not_explicit(fresh_dispatch, monkeypatch):
    monkeypatch.setenv("PEFTMED_KERNEL_IMPL", "torch")
    assert kernels.resolve("lora_linear", None, "cpu", torch.float32, 8)[0].name == "torch"
    kernels.clear_cache()
    monkeypatch.setenv("PEFTMED_KERNEL_IMPL_LORA_LINEAR", "nope")
    with pytest.raises(UnknownNameError, match="nope"):
        kernels.resolve("lora_linear", "auto", "cpu", torch.float32, 8)
    assert kernels.resolve("layer_norm", "auto", "cpu", torch.float32, 8)[0].name == "torch"
    assert kernels.resolve("lora_linear", "torch", "cpu", torch.float32, 8)[0].name == "torch"


def test_decisions_are_cached(fresh_dispatch):
    first = kernels.resolve("layer_norm", "torch", "cpu", torch.float32, 8)
    assert kernels.resolve("layer_norm", "torch", "cpu", torch.float32, 8) is first


def _plugin_with(*impls):
    @hookimpl
    def register_kernels(register):
        for impl in impls:
            register(impl)

    return types.SimpleNamespace(__name__="test_kernel_plugin", register_kernels=register_kernels)


@pytest.fixture
def registry_with(fresh_dispatch):
    """Make the default registry = built-ins + the given plugin objects, for one test."""
    old = plugins._default

    def make(*extra):
        reg = plugins.build_registry(load_entrypoints=False, extra_plugins=extra)
        plugins.set_default_registry(reg)
        return reg

    yield make
    plugins.set_default_registry(old)


def test_a_plugin_adds_an_implementation_auto_prefers_by_priority(registry_with):
    calls = []

    def forward(*args):
        calls.append("fwd")
        return lora_ref.forward(*args)

    mine = KernelImpl("lora_linear", "mine", 100, ("cpu",), (torch.float32,),
                      loader=lambda: {"forward": forward, "backward": lora_ref.backward})
    reg = registry_with(_plugin_with(mine))
    assert "lora_linear:mine" in reg.names("kernel")
    y = kernels.lora_linear(*_lora_args())
    assert calls == ["fwd"]
    torch.testing.assert_close(y, lora_ref.reference(*_lora_args()))


def test_build_failure_auto_falls_back_with_first_error_explicit_names_log(registry_with, tmp_path, caplog):
    log_path = tmp_path / "build.log"

    def broken():
        raise build.BuildError("lora_linear_cpu", log_path, "lora_linear.cpp:3:1: error: expected ';'")

    bad = KernelImpl("lora_linear", "broken", 100, ("cpu",), (torch.float32,), loader=broken)
    registry_with(_plugin_with(bad))
    with caplog.at_level(logging.WARNING, logger="peftmed.kernels"):
        y = kernels.lora_linear(*_lora_args())
    torch.testing.assert_close(y, lora_ref.reference(*_lora_args()))
    assert "error: expected ';'" in caplog.text
    assert kernels.resolve("lora_linear", "auto", "cpu", torch.float32, 2)[0].name != "broken"
    with pytest.raises(KernelUnavailableError, match=f"full log: {log_path}"):
        kernels.resolve("lora_linear", "broken", "cpu", torch.float32, 2)


def test_a_real_compiler_error_becomes_a_build_error(monkeypatch, tmp_path):
    ok, why = build.can_compile()
    if not ok:
        pytest.skip(why)
    src = tmp_path / "broken.cpp"
    src.write_text("int broken( {\n")  # fails at once, without parsing torch's headers
    monkeypatch.setitem(build.EXTENSIONS, "broken_test", {"sources": [str(src)], "cuda": False})
    monkeypatch.setenv("PEFTMED_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(build.BuildError) as info:
        build.load_extension("broken_test")
    assert "error" in info.value.first_error and "broken.cpp" in info.value.first_error
    assert info.value.log_path.is_file() and "broken.cpp" in info.value.log_path.read_text()


def test_cache_folder_is_per_version(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTMED_KERNEL_CACHE", str(tmp_path))
    root = build.cache_root()
    assert root.parent == tmp_path
    assert torch.__version__.split("+")[0] in root.name and "peftmed" in root.name


def test_the_build_cache_is_keyed_by_the_sources_not_the_checkout(monkeypatch, tmp_path):
    """The cache recorded the checkout's absolute source paths, so every other checkout rebuilt (85 s): the
    folder is keyed by the sources' bytes and they compile from a copy inside it."""
    import shutil

    monkeypatch.setenv("PEFTMED_KERNEL_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "another-checkout" / "csrc"
    shutil.copytree(build.CSRC, other, ignore=shutil.ignore_patterns("__pycache__"))
    for name in build.EXTENSIONS:
        assert build.build_folder(name, other) == build.build_folder(name)  # the same sources: the same cache
    header = other / "peftmed_cuda.cuh"
    header.write_text(header.read_text() + "\n// an edit\n")
    assert build.build_folder("lora_linear_cuda", other) != build.build_folder("lora_linear_cuda")
    src = other / "layer_norm" / "layer_norm.cpp"
    src.write_bytes(src.read_bytes() + b" ")
    assert build.build_folder("layer_norm_cpu", other) != build.build_folder("layer_norm_cpu")
    # what ninja is given: paths inside the cache folder, never the checkout's
    folder = build.build_folder("layer_norm_cpu")
    folder.mkdir(parents=True)
    staged = build._staged_sources("layer_norm_cpu", folder)
    assert staged.parent == folder and (staged / "layer_norm" / "layer_norm.cpp").read_bytes() == \
        (build.CSRC / "layer_norm" / "layer_norm.cpp").read_bytes()


def test_cli_lists_every_op_and_implementation(capsys):
    from peftmed.cli import main

    assert main(["kernels"]) == 0
    out = capsys.readouterr().out
    for op in ("lora_linear", "layer_norm"):
        for impl in ("torch", "cpp", "cuda", "triton"):
            assert any(line.split()[:2] == [op, impl] for line in out.splitlines()), (op, impl, out)
    assert "no CUDA device" in out or "CPU build" in out or torch.cuda.is_available()


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_torch_compile_traces_both_ops_without_graph_breaks(impl, request):
    if impl == "cpp":
        request.getfixturevalue("cpp_built")
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    w, a = torch.randn(16, 16), torch.randn(4, 16, requires_grad=True)
    b, g = torch.randn(16, 4, requires_grad=True), torch.ones(16, requires_grad=True)

    def f(x):
        h = kernels.lora_linear(x, w, None, a, b, 0.5, impl=impl)
        return kernels.layer_norm(h, g, torch.zeros(16), impl=impl).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x), [x, a, b, g])
    want = torch.autograd.grad(f(x), [x, a, b, g])
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v)


def test_a_failed_build_is_remembered_across_processes_until_retried(monkeypatch, tmp_path, fresh_dispatch):
    monkeypatch.setenv("PEFTMED_KERNEL_CACHE", str(tmp_path))
    if not build.can_compile()[0]:
        pytest.skip("no compiler here")
    log = build.build_folder("layer_norm_cpu") / "build.log"
    log.parent.mkdir(parents=True)
    log.write_text("x.cpp:1:1: error: 'foo' was not declared\nninja: build stopped: subcommand failed.\n")
    ok, why = build.extension_status("layer_norm_cpu")
    assert not ok and "error: 'foo' was not declared" in why and str(log) in why
    cpp = next(k for k in kernels.implementations("layer_norm") if k.name == "cpp")
    assert cpp.available() == (False, why)  # what `peftmed kernels` shows, without compiling
    build.forget_failure("layer_norm_cpu")
    assert build.extension_status("layer_norm_cpu") == (True, "")


def test_a_lock_left_by_a_killed_build_does_not_stop_the_next_one(monkeypatch, tmp_path, caplog):
    """A build killed mid-way leaves torch's ``lock`` file in the build folder, and torch then waits on it
    forever (every later use of the kernels hung): the next build removes it, under a lock of its own that
    the kernel releases when its holder dies, and builds."""
    import torch.utils.cpp_extension as cpp_ext

    monkeypatch.setenv("PEFTMED_KERNEL_CACHE", str(tmp_path / "cache"))
    folder = build.build_folder("layer_norm_cpu")
    folder.mkdir(parents=True)
    (folder / "lock").write_text("")  # what `timeout` killing the compiler leaves behind
    calls = []

    def fake_load(name, sources, build_directory, **kwargs):
        if (Path(build_directory) / "lock").exists():  # torch's FileBaton would wait here forever
            raise TimeoutError("waited on a stale lock")
        calls.append(sources)
        return "module"

    monkeypatch.setattr(cpp_ext, "load", fake_load)
    with caplog.at_level("WARNING", logger="peftmed.kernels.build"):
        assert build._jit_build("layer_norm_cpu") == "module"
    assert calls and not (folder / "lock").exists()
    assert "stopped before it finished" in caplog.text


def test_setup_py_reads_the_extension_table_without_importing_peftmed(tmp_path):
    """``PEFTMED_BUILD_EXT=1 pip install .`` loads build.py by path (peftmed is not importable yet while it is being
    installed): it failed there on a relative import. Run as setup.py runs it, in a process where importing peftmed
    fails, it lists every extension of every op with sources that exist."""
    import subprocess
    import sys

    blocker = tmp_path / "peftmed"  # first on the path: `import peftmed` fails in the child
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('peftmed must not be imported by setup.py')\n")
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('peftmed_kernels_build', {str(Path(build.__file__))!r})\n"
            "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)\n"
            "print(sorted(b.EXTENSIONS))\n"
            "print(all((b.CSRC / s).is_file() for e in b.EXTENSIONS.values() for s in e['sources']))\n"
            "print(sorted(e.name for e in b.setup_extensions()[0]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names, sources_exist, built = proc.stdout.split("\n")[:3]
    assert names == repr(sorted(build.EXTENSIONS))
    assert {e["op"] for e in build.EXTENSIONS.values()} == {"lora_linear", "layer_norm", "prefix_attention"}
    assert sources_exist == "True"
    cuda = torch.version.cuda is not None  # a CPU torch builds the C++ extensions only
    assert built == repr(sorted(f"{build.AOT_PACKAGE}.{n}" for n, e in build.EXTENSIONS.items() if cuda or not e["cuda"]))
