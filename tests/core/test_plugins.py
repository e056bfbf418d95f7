"""The plugin system: built-ins through the same hooks, third-party packages installed with pip,
broken plugins reported and skipped, duplicates naming both plugins, strict mode, selection."""

import os
import subprocess
import sys
import textwrap
import types

import pytest

import peftmed
from peftmed import PluginError
from peftmed.plugins import build_registry


def make_plugin(name, **hooks):
    mod = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(mod, hook_name, peftmed.hookimpl(fn))
    return mod


class Doubled(peftmed.Method):
    """A third-party select method: trains the q projections' biases."""

    name = "qbias"
    family = "select"
    default_roles = ("attn.q",)
    description = "q biases only"

    def select(self, ctx):
        return {f"{n}.bias": m.bias for n, (m, _) in ctx.matched().items()}


def test_builtins_are_registered_through_hooks():
    reg = build_registry(load_entrypoints=False)
    assert {"lora", "ia3", "layernorm", "ffn", "attention", "bitfit", "full", "frozen"} <= set(reg.names("method"))
    assert reg.owner("method", "lora").name == "peftmed.methods.lora"
    assert all(p.builtin and p.ok for p in reg.plugins)


def test_in_process_plugin_adds_a_method_recipes_can_use():
    plugin = make_plugin("qbias_plugin", register_methods=lambda register: register(Doubled()))
    reg = build_registry(load_entrypoints=False, extra_plugins=[plugin])
    m = peftmed.build_backbone("toy-vlm")
    pm = peftmed.apply(m, "fusion=qbias", registry=reg)
    assert pm.trainable_report().trainable == 2 * 32


def test_duplicate_name_is_reported_naming_both_plugins_and_skipped():
    class FakeLora(Doubled):
        name = "lora"

    plugin = make_plugin("dup_plugin", register_methods=lambda register: register(FakeLora()))
    reg = build_registry(load_entrypoints=False, extra_plugins=[plugin])
    failed = reg.failed_plugins()
    assert len(failed) == 1 and "built-in plugin peftmed.methods.lora" in failed[0].error and "dup_plugin" in failed[0].error
    assert type(reg.method("lora")).__module__ == "peftmed.methods.lora"
    with pytest.raises(PluginError, match="registered by both"):
        build_registry(load_entrypoints=False, extra_plugins=[plugin], strict=True)


def test_unknown_hook_name_fails_loudly():
    plugin = make_plugin("typo_plugin", register_method=lambda register: None)  # missing 's'
    reg = build_registry(load_entrypoints=False, extra_plugins=[plugin])
    assert "unknown hook 'register_method'" in reg.failed_plugins()[0].error


def test_hook_with_argument_not_in_spec_is_reported():
    plugin = make_plugin("argy_plugin", register_methods=lambda register, device: None)
    reg = build_registry(load_entrypoints=False, extra_plugins=[plugin])
    assert "device" in reg.failed_plugins()[0].error


def test_plugin_whose_hook_raises_is_skipped_and_rest_keeps_working():
    def boom(register):
        register(Doubled())
        raise RuntimeError("kaboom")

    reg = build_registry(load_entrypoints=False, extra_plugins=[make_plugin("boom_plugin", register_methods=boom)])
    assert "kaboom" in reg.failed_plugins()[0].error
    assert "qbias" not in reg.names("method")  # nothing half-registered
    assert "lora" in reg.names("method")


# ---- third-party packages installed with pip -------------------------------------------------------

GOOD = '''
import peftmed
from dataclasses import dataclass
from torch import nn


@dataclass
class HeadScaleConfig(peftmed.MethodConfig):
    init: float = 1.0  # starting scale


class HeadScale(peftmed.Method):
    name = "headscale"
    family = "select"
    config_class = HeadScaleConfig
    default_roles = ("attn.o",)
    description = "train attention output weights only"

    def select(self, ctx):
        return {f"{n}.weight": m.weight for n, (m, _) in ctx.matched().items()}


@peftmed.hookimpl
def register_methods(register):
    register(HeadScale())
'''


def write_package(root, dist, module, code):
    pkg = root / dist
    (pkg / module).mkdir(parents=True)
    (pkg / module / "__init__.py").write_text(textwrap.dedent(code))
    (pkg / "pyproject.toml").write_text(textwrap.dedent(f'''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{dist}"
        version = "0.3.1"
        [project.entry-points.peftmed]
        {module} = "{module}"
        [tool.setuptools]
        packages = ["{module}"]
    '''))
    return pkg


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """Two plugin packages, pip-installed (as a user would) into a folder put on PYTHONPATH."""
    root = tmp_path_factory.mktemp("plugins")
    site = root / "site"
    good = write_package(root, "peftmed-plugin-headscale", "peftmed_headscale", GOOD)
    bad = write_package(root, "peftmed-plugin-broken", "peftmed_broken", "raise ImportError('missing dependency xyz')\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(good), str(bad)], check=True, capture_output=True)
    return site


def cli(site, *args, **env):
    base = {k: v for k, v in os.environ.items() if k not in {"PEFTMED_STRICT_PLUGINS", "PEFTMED_PLUGINS"}}
    full_env = {**base, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run([sys.executable, "-m", "peftmed", *args], capture_output=True, text=True, env=full_env)


def test_pip_installed_plugin_adds_a_method_with_no_core_change(plugin_site):
    out = cli(plugin_site, "methods")
    assert out.returncode == 0, out.stderr
    assert "headscale" in out.stdout and "peftmed-plugin-headscale 0.3.1" in out.stdout
    check = cli(plugin_site, "recipe", "check", "fusion=headscale decoder=lora(r=2)", "--backbone", "toy-vlm")
    assert check.returncode == 0, check.stderr
    assert "headscale" in check.stdout and f"{2 * 32 * 32:,}" in check.stdout


def test_broken_plugin_is_reported_and_cli_keeps_working(plugin_site):
    out = cli(plugin_site, "plugins")
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if "peftmed-plugin-broken" in l)
    assert "FAILED" in line and "missing dependency xyz" in line and "0.3.1" in line
    assert "missing dependency xyz" in out.stderr  # also logged as a warning
    assert cli(plugin_site, "methods").returncode == 0


def test_strict_mode_turns_a_broken_plugin_into_an_error(plugin_site):
    out = cli(plugin_site, "methods", PEFTMED_STRICT_PLUGINS="1")
    assert out.returncode == 2
    assert "peftmed-plugin-broken" in out.stderr and "missing dependency xyz" in out.stderr


def test_plugin_selection_by_environment(plugin_site):
    only_good = cli(plugin_site, "plugins", PEFTMED_PLUGINS="peftmed-plugin-headscale")
    assert "peftmed-plugin-headscale" in only_good.stdout and "broken" not in only_good.stdout
    none = cli(plugin_site, "methods", PEFTMED_PLUGINS="")
    assert "headscale" not in none.stdout and "lora" in none.stdout
