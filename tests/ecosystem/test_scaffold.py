"""`peftmed plugin new`: the generated packages install and pass their own conformance tests."""

import os
import subprocess
import sys

import pytest

from peftmed.cli import main
from peftmed.errors import ConfigError, PeftmedError
from peftmed.scaffold import KINDS, create_plugin


def _pip(*args):
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_generated_plugins_install_and_pass_their_tests(tmp_path):
    stem = f"tmpl{os.getpid()}"  # unique: the packages are installed into the shared environment
    roots = [create_plugin(f"{stem}-{kind}", kind, tmp_path) for kind in KINDS]
    dists = [r.name for r in roots]
    installed = _pip("install", "--no-build-isolation", "--no-deps", "-q", *map(str, roots))
    try:
        assert installed.returncode == 0, installed.stderr
        env = dict(os.environ, PEFTMED_STRICT_PLUGINS="1", PEFTMED_PLUGINS=",".join(dists),
                   PEFTMED_TEST_BACKBONES=f"toy-vlm,{stem}-backbone-tiny", HF_HUB_OFFLINE="1")
        listed = subprocess.run([sys.executable, "-m", "peftmed", "plugins"], capture_output=True, text=True, env=env)
        for dist in dists:
            assert dist in listed.stdout
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(str(r / "tests") for r in roots)],
            capture_output=True, text=True, env=env, cwd=tmp_path,
        )
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        assert " passed" in run.stdout and "failed" not in run.stdout
    finally:
        _pip("uninstall", "-y", "-q", *dists)


def test_existing_folder_is_refused_and_kept(tmp_path):
    root = create_plugin("my-method", "method", tmp_path)
    module = root / "peftmed_my_method" / "__init__.py"
    module.write_text("# my edits\n")
    with pytest.raises(PeftmedError, match="already exists; nothing was written"):
        create_plugin("my-method", "backbone", tmp_path)
    assert module.read_text() == "# my edits\n"
    assert sorted(p.name for p in root.iterdir()) == ["README.md", "peftmed_my_method", "pyproject.toml", "tests"]


def test_cli_refuses_existing_folder(tmp_path, capsys):
    assert main(["plugin", "new", "x-kernel", "--kind", "kernel", "--dir", str(tmp_path)]) == 0
    assert main(["plugin", "new", "x-kernel", "--kind", "kernel", "--dir", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["My_Method", "1method", "a--b", ""])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="is not valid"):
        create_plugin(name, "method", tmp_path)
    assert not any(tmp_path.iterdir())


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="expected one of method, backbone, kernel, dataset"):
        create_plugin("abc", "metric", tmp_path)


def test_pyproject_declares_the_entry_point(tmp_path):
    import tomllib

    root = create_plugin("peftmed-plugin-abc", "dataset", tmp_path)
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    assert root.name == "peftmed-plugin-abc"
    assert meta["project"]["entry-points"]["peftmed"] == {"abc": "peftmed_abc"}
