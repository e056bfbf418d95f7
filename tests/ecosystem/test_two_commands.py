"""The README's two commands on a Python that refuses global installs (PEP 668).

CI runs `make bench` and `make test` with PYTHON=.ci/externally-managed-python3; these tests check that the
stand-in refuses what a stock Debian python3 refuses, and that the Makefile never asks it to."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / ".ci" / "externally-managed-python3"

pytestmark = pytest.mark.skipif(shutil.which("make") is None or shutil.which("bash") is None,
                                reason="needs make and bash")


def _env() -> dict[str, str]:
    return {**os.environ, "PEFTMED_REAL_PYTHON": sys.executable}


def test_stand_in_refuses_global_installs_as_debian_does():
    done = subprocess.run([str(SHIM), "-m", "pip", "install", "--dry-run", "tqdm"], env=_env(),
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert "externally-managed-environment" in done.stderr
    ok = subprocess.run([str(SHIM), "-c", "import sys; print(sys.prefix)"], env=_env(), capture_output=True,
                        text=True)
    assert ok.returncode == 0 and ok.stdout.strip()


def test_makefile_installs_only_into_its_own_environment(tmp_path):
    venv = tmp_path / "venv"
    # every command `make bench` and `make test` would run, without running them
    for target in ("bench", "test"):
        plan = subprocess.run(["make", "-n", "-B", target, f"PYTHON={SHIM}", f"VENV={venv}"], cwd=ROOT, env=_env(),
                              capture_output=True, text=True)
        assert plan.returncode == 0, plan.stderr
        installs = re.findall(r"(\S+) -m pip (?:--python (\S+) )?install", plan.stdout)
        assert installs, plan.stdout
        for python, target in installs:
            # pip runs in the environment's python, or the system's pip is pointed at it with --python
            assert f"{venv}/bin/python" in (python, target), (python, target)
        assert len(installs) == len(re.findall(r"\bpip\b.*?\binstall\b", plan.stdout)), plan.stdout
        runs = re.findall(r"(\S+)(?:/peftmed bench| -m pytest)", plan.stdout)
        assert runs and all(run in (f"{venv}/bin", f"{venv}/bin/python") for run in runs), runs


def test_makefile_creates_a_virtual_environment_with_pip_on_the_stand_in(tmp_path):
    venv = tmp_path / "venv"
    done = subprocess.run(["make", f"{venv}/bin/python", f"PYTHON={SHIM}", f"VENV={venv}"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    probe = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import sys, pip; print(sys.prefix != sys.base_prefix)"], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "True"


def test_ci_runs_the_readme_commands_on_the_stand_in():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ("make bench", "make test"):
        assert f"{command}  " in readme or f"{command}\n" in readme or f"{command} " in readme, command
        assert f"{command} PYTHON=.ci/externally-managed-python3" in ci, command
