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


@pytest.fixture
def install(tmp_path, monkeypatch):
    """install(dist, version, entry_name, source): a fake installed distribution."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made = []

    def _install(dist, version, entry_name, source):
        module = f"mod_{dist.replace('-', '_')}"
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        info = tmp_path / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[peftmed]\n{entry_name} = {module}\n")
        made.append(module)
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
