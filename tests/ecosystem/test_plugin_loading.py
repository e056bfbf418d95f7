"""Installed plugins as a user gets them: reported by distribution, duplicates named, selection works.

Distributions are faked cheaply: a ``*.dist-info`` folder (METADATA + entry_points.txt) and a module
on ``sys.path`` are exactly what importlib.metadata reads for an installed package.
"""

import importlib.metadata as md
import sys
import textwrap

import pytest

import peftmed
from peftmed.errors import PluginError

METHOD_PLUGIN = '''
import peftmed

class Twin(peftmed.Method):
    name = "twin"
    family = "select"
    def select(self, ctx):
        return {}

@peftmed.hookimpl
def register_methods(register):
    register(Twin())
'''

BAD_ARGUMENT_PLUGIN = '''
import peftmed

@peftmed.hookimpl
def register_methods(register, device):  # the hookspec has no 'device'
    pass
'''


def _fake_dist(folder, dist, source, version="1.0", entry_name=None):
    """A module and the dist-info folder importlib.metadata reads for an installed distribution."""
    module = f"mod_{dist.replace('-', '_')}"
    (folder / f"{module}.py").write_text(textwrap.dedent(source))
    info = folder / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[peftmed]\n{entry_name or dist} = {module}\n")
    return module


@pytest.fixture
def install(tmp_path, monkeypatch):
    """install(dist, version, entry_name, source): a fake installed distribution."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made = []

    def _install(dist, version, entry_name, source):
        made.append(_fake_dist(tmp_path, dist, source, version, entry_name))
        return dist

    yield _install
    for module in made:
        sys.modules.pop(module, None)


def test_hook_argument_not_in_hookspec_is_reported_with_the_plugin_name(install, monkeypatch):
    install("peftmed-plugin-badarg", "0.3", "badarg", BAD_ARGUMENT_PLUGIN)
    monkeypatch.setenv("PEFTMED_PLUGINS", "peftmed-plugin-badarg")
    reg = peftmed.build_registry(strict=False)
    (failed,) = reg.failed_plugins()
    assert (failed.distribution, failed.version) == ("peftmed-plugin-badarg", "0.3")
    assert "device" in failed.error
    with pytest.raises(PluginError, match=r"(?s)peftmed-plugin-badarg 0\.3.*device"):
        peftmed.build_registry(strict=True)


def test_same_method_from_two_distributions_names_both(install, monkeypatch):
    install("peftmed-plugin-one", "1.0", "one", METHOD_PLUGIN)
    install("peftmed-plugin-two", "2.0", "two", METHOD_PLUGIN)
    monkeypatch.setenv("PEFTMED_PLUGINS", "peftmed-plugin-one,peftmed-plugin-two")
    with pytest.raises(PluginError, match=r"(?s)'twin'.*peftmed-plugin-(one|two).*peftmed-plugin-(one|two)") as err:
        peftmed.build_registry(strict=True)
    assert "peftmed-plugin-one 1.0" in str(err.value) and "peftmed-plugin-two 2.0" in str(err.value)
    reg = peftmed.build_registry(strict=False)  # not strict: the first wins, the second is reported
    assert "twin" in reg.names("method")
    (failed,) = reg.failed_plugins()
    assert "registered by both" in failed.error


def test_methods_listed_only_when_installed(install, monkeypatch, capsys):
    from peftmed.cli import main
    from peftmed.plugins import set_default_registry

    monkeypatch.setenv("PEFTMED_PLUGINS", "peftmed-plugin-one")
    set_default_registry(None)
    try:
        main(["methods"])
        assert "twin" not in capsys.readouterr().out
        install("peftmed-plugin-one", "1.0", "one", METHOD_PLUGIN)
        set_default_registry(None)
        main(["methods"])
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("twin"))
        assert "peftmed-plugin-one 1.0" in line
    finally:
        set_default_registry(None)


@pytest.mark.parametrize("dist,method", [("peftmed-plugin-dora", "dora"), ("peftmed-plugin-vera", "vera")])
def test_example_plugins_listed_only_when_selected(dist, method, monkeypatch):
    try:
        md.distribution(dist)
    except md.PackageNotFoundError:
        pytest.skip(f"{dist} is not installed (pip install --no-build-isolation --no-deps -e plugins/{dist})")
    monkeypatch.setenv("PEFTMED_PLUGINS", dist)
    assert method in peftmed.build_registry().names("method")
    monkeypatch.setenv("PEFTMED_PLUGINS", "")
    assert method not in peftmed.build_registry().names("method")


EXITING_PLUGIN = '''
import sys
sys.exit(3)  # a plugin that ends the process while being imported
'''

EXITING_HOOK_PLUGIN = '''
import sys
import peftmed

@peftmed.hookimpl
def register_methods(register):
    raise SystemExit("bye")
'''




INTERRUPTING_PLUGIN = '''
raise KeyboardInterrupt
'''

OS_EXIT_PLUGIN = '''
import os
os._exit(7)
'''


@pytest.mark.parametrize("source, needle", [(EXITING_PLUGIN, "SystemExit(3)"), (EXITING_HOOK_PLUGIN, "SystemExit('bye')"),
                                            (INTERRUPTING_PLUGIN, "raised KeyboardInterrupt while loading"),
                                            (OS_EXIT_PLUGIN, "called os._exit(7) while loading")])
def test_a_plugin_calling_sys_exit_is_reported_and_every_command_still_runs(tmp_path, source, needle):
    import os
    import subprocess

    _fake_dist(tmp_path, "peftmed-plugin-exits", source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "PEFTMED_PLUGINS": "peftmed-plugin-exits"}
    env.pop("PEFTMED_STRICT_PLUGINS", None)
    plugins = subprocess.run([sys.executable, "-m", "peftmed", "plugins"], capture_output=True, text=True, env=env)
    assert plugins.returncode == 0, plugins.stderr
    line = next(x for x in plugins.stdout.splitlines() if x.startswith("peftmed-plugin-exits"))
    assert "FAILED" in line and needle in line
    methods = subprocess.run([sys.executable, "-m", "peftmed", "methods"], capture_output=True, text=True, env=env)
    assert methods.returncode == 0 and "layernorm" in methods.stdout
    assert "peftmed-plugin-exits" in methods.stderr and "failed to load" in methods.stderr
    imported = subprocess.run([sys.executable, "-c", "import peftmed; peftmed.default_registry(); print('alive')"],
                              capture_output=True, text=True, env=env)
    assert imported.returncode == 0 and "alive" in imported.stdout


def test_peftmed_plugins_naming_no_installed_plugin_warns(monkeypatch, caplog):
    monkeypatch.setenv("PEFTMED_PLUGINS", "nonexistent")
    reg = peftmed.build_registry(strict=False)
    assert "layernorm" in reg.names("method")
    assert "PEFTMED_PLUGINS names 'nonexistent', but no installed peftmed plugin has that" in caplog.text
    with pytest.raises(PluginError, match="'nonexistent'"):
        peftmed.build_registry(strict=True)


def test_hooks_are_called_through_pluggy_so_a_plugins_wrapper_runs():
    """A plugin's hook wrapper (pluggy's wrapper=True) registered nothing: its function was called directly, which
    only makes a generator. Through pluggy's calling, the wrapper and the plain implementation both register."""
    from peftmed.methods.base import Method

    class One(Method):
        name = "from-wrapper"
        family = "select"

        def select(self, ctx):
            return {}

    class Two(One):
        name = "from-impl"

    class Plugin:
        @peftmed.hookimpl(wrapper=True, specname="register_methods")
        def wrap(self, register):
            register(One())
            return (yield)

        @peftmed.hookimpl
        def register_methods(self, register):
            register(Two())

    reg = peftmed.build_registry(load_entrypoints=False, extra_plugins=[Plugin()])
    assert {"from-wrapper", "from-impl"} <= set(reg.names("method"))
