"""A wheel built from the repository carries the kernels' C++/CUDA sources, and an installed (not editable)
peftmed builds and reports its C++ ops from them. The wheel goes into a fresh virtual environment that sees
the test environment's dependencies (torch, ...) through a path file but not its editable peftmed."""

import json
import os
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("peftmed/kernels/csrc/peftmed_cuda.cuh", "peftmed/kernels/csrc/lora_linear/lora_linear.cpp",
           "peftmed/kernels/csrc/lora_linear/lora_linear.cu", "peftmed/kernels/csrc/layer_norm/layer_norm.cpp",
           "peftmed/kernels/csrc/layer_norm/layer_norm.cu", "peftmed/kernels/csrc/prefix_attention/prefix_attention.cu",
           "peftmed/kernels/csrc/prefix_attention/prefix_attention_cuda.cpp")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-build-isolation", "--no-deps",
                           "-q", "-w", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = out.glob("peftmed-*.whl")
    return found


def test_the_wheel_carries_the_kernel_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [s for s in SOURCES if s not in names]
    assert not missing, f"the wheel lacks {missing}"
    metadata = next(n for n in names if n.endswith("METADATA"))
    assert "Requires-Python: >=3.11" in zipfile.ZipFile(wheel).read(metadata).decode()


@pytest.mark.slow
def test_an_installed_wheel_builds_its_cpp_kernels(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # the dependencies of this environment, without processing its .pth files (the editable peftmed)
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    (purelib / "_test_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    env = {**os.environ, "PEFTMED_PLUGINS": "", "PYTHONPATH": ""}
    where = subprocess.run([str(python), "-c", "import peftmed; print(peftmed.__file__)"], capture_output=True,
                           text=True, cwd=tmp_path, env=env, timeout=300)
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()).is_relative_to(venv), f"imported {where.stdout.strip()}, not the wheel"

    listed = subprocess.run([str(python), "-m", "peftmed", "kernels", "--json"], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    assert listed.returncode == 0, listed.stderr[-2000:]
    rows = {(r["op"], r["impl"]): r for r in json.loads(listed.stdout)}
    assert rows[("lora_linear", "cpp")]["available"] and rows[("layer_norm", "cpp")]["available"]
    assert rows[("lora_linear", "cpp")]["auto_on"] == ["cpu"]

    built = subprocess.run([str(python), "-m", "peftmed", "kernels", "--build"], capture_output=True, text=True,
                           cwd=tmp_path, env=env, timeout=900)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    assert "built lora_linear:cpp" in built.stdout and "built layer_norm:cpp" in built.stdout
    assert str(venv) in built.stdout  # the sources it reports are the installed package's
