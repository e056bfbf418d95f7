"""The compile-time gate of the Triton kernels: every launch configuration the dispatcher can choose at the
target shapes compiles for sm_90 and sm_80 with no register spill and within the target's shared memory
(``peftmed.kernels.aot``, printed by ``benchmarks/kernels/aot_report.py``). No GPU needed: Triton compiles
ahead of time for any NVIDIA target and ships ptxas.

The report runs in a subprocess without TRITON_INTERPRET (under the interpreter ``triton.jit`` gives
interpreted functions, which cannot be compiled)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _ptxas_present() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


pytestmark = pytest.mark.skipif(not _ptxas_present(), reason="triton's NVIDIA backend (ptxas) is not installed")


# the GPU machine's Triton, installed beside the pinned one by `make install` (requirements-triton-gpu.txt)
GPU_TRITON = Path(sys.prefix) / "triton-gpu"


def _clean_env(second_triton: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = ([str(GPU_TRITON)] if second_triton else []) + [str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _run(code: str, second_triton: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_clean_env(second_triton), cwd=ROOT, timeout=1200)


@pytest.fixture(scope="module", params=["pinned", "gpu-machine"])
def report(request, tmp_path_factory):
    """The report under the pinned Triton (sm_90 and sm_80) and under the GPU machine's (sm_90: its GPU)."""
    second = request.param == "gpu-machine"
    if second and not (GPU_TRITON / "triton").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{GPU_TRITON} is missing: `make install` puts the GPU machine's Triton there")
        pytest.skip(f"the GPU machine's Triton is not installed in {GPU_TRITON} (make install)")
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    arches = ["--arch", "90"] + ([] if second else ["--arch", "80"])
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels" / "aot_report.py"), *arches,
                           "--json", str(out)], capture_output=True, text=True, env=_clean_env(second), cwd=ROOT,
                          timeout=1800)
    assert out.exists(), f"the report wrote nothing (exit {proc.returncode}): {proc.stderr[-3000:]}"
    if second:
        assert "triton 3.6" in proc.stdout, proc.stdout[:500]
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_no_configuration_spills_or_exceeds_shared_memory(report):
    proc, rows = report
    bad = [f"{r['arch']} {r['kernel']} [{r['config']}] {r['warps']} warps: {r['registers']} registers, "
           f"{r['spill_stores'] + r['spill_loads']} B spilled, {r['shared']} B shared (limit {r['shared_limit']})"
           for r in rows if not r["ok"]]
    assert not bad, "\n".join(bad)
    assert proc.returncode == 0, proc.stdout[-2000:]


@pytest.mark.slow
def test_the_report_covers_every_kernel_on_both_targets(report):
    from peftmed.kernels.layer_norm.impls import TRITON_MAX_WIDTH
    from peftmed.kernels.lora_linear.impls import TRITON_MAX_RANK

    proc, rows = report
    arches = ("sm_90", "sm_80") if "sm_80" in proc.stdout else ("sm_90",)
    seen = {(r["arch"], r["kernel"]) for r in rows}
    kernels = {"_gemm_lora_kernel", "_down_kernel", "_wgrad_kernel", "_gs_db_kernel", "_reduce_kernel", "_fwd_kernel",
               "_bwd_kernel",
               "_dkdv_kernel", "_dq_kernel", "_delta_kernel"}
    # the persistent LoRA kernel is Hopper's alone (TMA, wgmma): sm_90 only
    assert seen == {(a, k) for a in arches for k in kernels} | {("sm_90", "_persistent_kernel")}
    configs = " ".join(r["config"] for r in rows)
    # (LayerNorm at 1024 compiles to the kernel at 768: the same tiles, both widths divisible by 16; one row)
    for needed in ("r=16", f"r={TRITON_MAX_RANK}", "560x768", "N=768", f"N={TRITON_MAX_WIDTH}",
                   "D=64", "D=128", "mask+causal+dropout", "bf16", "fp16", "fp32"):
        assert needed in configs, needed
    # the tensor-core path is Hopper's on sm_90 for the bf16 GEMMs (not the Ampere mma.sync fallback)
    gemm90 = [r for r in rows if r["arch"] == "sm_90" and r["kernel"] in ("_gemm_lora_kernel", "_persistent_kernel")
              and "bf16" in r["config"]]
    assert gemm90 and all(r["mma"] == "wgmma" for r in gemm90)
    # prefix attention's bf16 kernels take Hopper's tensor-core path too, D=128 dk/dv included (its sm_90 tiles)
    prefix90 = [r for r in rows if r["arch"] == "sm_90" and r["op"] == "prefix_attention" and "bf16" in r["config"]
                and r["kernel"] in ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel")]
    assert prefix90 and [r["kernel"] + " " + r["config"] for r in prefix90 if r["mma"] != "wgmma"] == []
    # the persistent kernel at every rank block it takes, with dB accumulated and with B frozen
    persistent = " | ".join(r["config"] for r in rows if r["config"].startswith("persistent "))
    for needed in ("r=16", "r=32", "r=64", "forward DROPOUT", "backward W_KN ACC_DB", "backward ATOMIC", "B frozen"):
        assert needed in persistent, needed


@pytest.mark.slow
def test_the_report_compiles_what_the_jit_compiles(report):
    """Compiled as the JIT compiles the launch (unit strides constant, aligned pointers and sizes marked), the main
    GEMM holds its K loop's stages in shared memory in under 200 registers; compiled without that (as the report
    did before), the same tiles took 252 registers and 32 KB: a different kernel from the one that runs."""
    _, rows = report
    big = [r for r in rows if r["arch"] == "sm_90" and r["kernel"] == "_gemm_lora_kernel"
           and r["config"].startswith("bf16 r=16 8192x4096->4096 forward")]
    assert big, "the main GEMM is missing from the report"
    for r in big:
        assert r["registers"] < 200 and r["shared"] > 64 * 1024, r


def test_a_launch_is_specialised_as_the_jit_specialises_it():
    """The cases are the launchers' own launches at the target shapes, recorded with meta tensors as on a GPU:
    a unit stride becomes a constant, a size divisible by 16 is marked so, an odd one is not."""
    proc = _run(
        "import torch\n"
        "from peftmed.kernels import aot\n"
        "from peftmed.kernels.lora_linear import triton_impl as t\n"
        "for m in (8192, 35):\n"
        "    x, w = torch.empty(m, 4096, device='meta', dtype=torch.bfloat16), torch.empty(4096, 4096, device='meta',"
        " dtype=torch.bfloat16)\n"
        "    a, b = torch.empty(16, 4096, device='meta', dtype=torch.bfloat16), torch.empty(4096, 16, device='meta',"
        " dtype=torch.bfloat16)\n"
        "    with aot.recorded_launches() as launches:\n"
        "        t.forward(x, w, None, a, b, 2.0, 0.0, 1)\n"
        "    gemm = next(c for c in launches if c.name == '_gemm_lora_kernel')\n"
        "    _, sig, consts, attrs = aot.specialise(gemm)\n"
        "    names = gemm.kernel.arg_names\n"
        "    i = names.index('M')\n"
        "    print(m, gemm.kwargs['BLOCK_M'], sig['sxk'], sig['swk'], sig['sxm'], bool(attrs.get((i,))))\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    big, odd = (line.split() for line in proc.stdout.splitlines())
    # as on a GPU: 128-row tiles at 8192 rows (the interpreter's are 32); x's and W's unit strides are constants
    assert big == ["8192", "128", "constexpr", "constexpr", "i32", "True"]
    assert odd[0] == "35" and odd[2:] == ["constexpr", "constexpr", "i32", "False"]


def test_the_gate_sees_a_spill():
    """A configuration known to spill (a 16384-wide LayerNorm backward row in 16 warps: capped at 128
    registers) is reported as not ok: the gate above can fail."""
    proc = _run(
        "import torch\n"
        "from peftmed.kernels import aot\n"
        "from peftmed.kernels.layer_norm import triton_impl as t\n"
        "m = lambda *s: torch.empty(*s, device='meta')\n"
        "case = aot.AotCase('layer_norm', t._bwd_kernel, 'N=16384', (m(64, 16384), m(64, 16384), m(16384), m(64), m(64),"
        " m(64, 16384), m(1, 2, 16384), m(1, 16384), 64, 16384, 64),"
        " dict(NEED_DX=True, BLOCK_M=1, BLOCK_N=16384, num_warps=16, num_stages=1))\n"
        "r = aot.compile_case(case, 90)\n"
        "print(r['ok'], r['spill_stores'] + r['spill_loads'], r['registers'])\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ok, spilled, regs = proc.stdout.split()
    assert ok == "False" and int(spilled) > 0 and int(regs) <= 128


def test_the_dispatcher_keeps_what_cannot_compile_away_from_triton(fresh_dispatch):
    """Rows wider than the widest gated LayerNorm, ranks above the gated LoRA rank and heads above the gated
    head dim are not Triton's to take: the limits each op's folder declares are the ones dispatch applies."""
    from peftmed.kernels import plugin
    from peftmed.kernels.layer_norm import impls as ln
    from peftmed.kernels.lora_linear import impls as lora
    from peftmed.kernels.prefix_attention import impls as prefix
    from peftmed.kernels.registry import KernelCall

    impls = {(k.op, k.name): k for k in plugin.builtin_impls()}
    ln_t, lora_t, prefix_t = (impls[(op, "triton")] for op in ("layer_norm", "lora_linear", "prefix_attention"))

    def refuses(impl, dtype, size, device="cuda"):
        return impl.refuses(KernelCall(device, dtype, size, explicit=True))

    assert refuses(ln_t, torch.bfloat16, ln.TRITON_MAX_WIDTH) is None
    assert "row width 8192 is above the Triton kernel's 4096" in refuses(ln_t, torch.bfloat16, 8192)
    assert refuses(lora_t, torch.bfloat16, lora.TRITON_MAX_RANK) is None
    assert "rank 256 is above" in refuses(lora_t, torch.bfloat16, lora.TRITON_MAX_RANK * 2)
    assert prefix.MAX_HEAD_DIM["triton"] == 128
    assert "head dim 256 is above" in refuses(prefix_t, torch.bfloat16, 256)
    assert refuses(impls[("prefix_attention", "cuda")], torch.bfloat16, 256) is None
    # fp32 on a GPU stops lower (three TF32 passes hold more registers); bf16 does not; the CPU interpreter
    # (no registers to spill) takes every size it took before
    top = lora.TRITON_FP32_MAX_RANK
    assert refuses(lora_t, torch.float32, top) is None
    assert f"fp32 at rank {top * 2} is above" in refuses(lora_t, torch.float32, top * 2)
    assert refuses(lora_t, torch.bfloat16, top * 2) is None
    assert "fp32 at head dim 128" in refuses(prefix_t, torch.float32, 128)
    assert refuses(prefix_t, torch.bfloat16, 128) is None
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert refuses(lora_t, torch.float32, top * 2, device="cpu") is None
        # auto never takes the interpreter
        assert "only when asked for by name" in lora_t.refuses(KernelCall("cpu", torch.float32, 16))


def test_lora_tiles_are_keyed_by_shape():
    """Large outputs get 128-row tiles; an output with fewer such tiles than the GPU has SMs gets 64 x 64 ones
    (both gated above); the interpreter keeps its small tiles whatever the shape."""
    import torch

    from peftmed.kernels.lora_linear.triton_impl import gemm_config

    big = gemm_config(torch.bfloat16, True, 16, 8192, 4096, 132)
    small = gemm_config(torch.bfloat16, True, 16, 560, 768, 132)
    assert (big["BLOCK_M"], big["BLOCK_N"], big["num_warps"]) == (128, 128, 8)
    assert (small["BLOCK_M"], small["BLOCK_N"], small["num_warps"]) == (64, 64, 4)
    assert gemm_config(torch.bfloat16, False, 16, 560, 768, 132)["BLOCK_M"] == 32


def test_the_persistent_lora_kernel_runs_one_program_per_sm_on_128_x_256_tiles():
    """What the persistent schedule's freedom from deadlock rests on (peftmed/kernels/lora_linear/persistent.py): no
    more programs than the GPU has SMs (all resident at once), on the tiles the gate compiled; a grid smaller than
    the GPU (a BLIP layer) goes to today's kernels instead."""
    proc = _run(
        "import torch\n"
        "from peftmed.kernels.aot import meta, recorded_launches\n"
        "from peftmed.kernels.lora_linear import persistent\n"
        "for m, d in ((8192, 4096), (560, 768)):\n"
        "    with recorded_launches(sms=132) as launches:\n"
        "        persistent.forward(meta(m, d), meta(d, d), None, meta(16, d), meta(d, 16), 2.0, 0.0, 1)\n"
        "    for c in launches:\n"
        "        print(m, c.name, c.grid, c.kwargs['BLOCK_M'], c.kwargs.get('BLOCK_N'), c.kwargs['num_warps'])\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["8192 _persistent_kernel (132,) 128 256 8",
                                        "560 _down_kernel (9,) 64 None 4",
                                        "560 _gemm_lora_kernel (108,) 64 64 4"]
