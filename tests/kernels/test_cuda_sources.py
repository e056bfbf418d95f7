"""Every .cu file of the kernels compiles with nvcc (where nvcc is present; the CPU torch here cannot
build a CUDA extension, so this is what checks the CUDA code in CI), and on a GPU the CUDA and Triton
implementations match the oracle for real."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from peftmed.kernels.build import CSRC

CU_FILES = sorted(CSRC.glob("*/*.cu"))


def test_every_op_has_cuda_sources():
    assert {p.parent.name for p in CU_FILES} == {"lora_linear", "layer_norm", "prefix_attention"}


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cu_file_compiles_with_nvcc_without_spills(cu: Path, arch, tmp_path):
    """Every kernel of every .cu compiles for Hopper and Ampere, and ptxas spills no register of any."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    proc = subprocess.run([nvcc, "-c", f"-arch={arch}", "-O3", "-Xptxas", "-v", f"-I{CSRC}", str(cu),
                           "-o", str(tmp_path / "k.o")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spills = re.findall(r"Function properties for (\S+)\n\s*\d+ bytes stack frame, (\d+) bytes spill stores, "
                        r"(\d+) bytes spill loads", proc.stderr + proc.stdout)
    assert spills, "ptxas -v reported no function"
    bad = [f"{name}: {st} B stored, {ld} B loaded" for name, st, ld in spills if int(st) or int(ld)]
    assert not bad, "\n".join(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_implementations_match_the_oracle(impl, dtype):
    from test_layer_norm import check_against_oracle as check_ln
    from test_lora_linear import check_against_oracle as check_lora

    for case in [(1, 7, 5, 1, True, 0.0), (37, 129, 70, 8, False, 0.25), (300, 768, 768, 16, True, 0.1)]:
        check_lora(impl, *case, dtype, 0)
    for rows, n in [(1, 7), (333, 768), (4096, 1024)]:
        check_ln(impl, rows, n, dtype, rows)
