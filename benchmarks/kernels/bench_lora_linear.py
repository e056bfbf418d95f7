"""LoRA linear forward + backward: peftmed's implementations against the frozen base linear alone,
peft's LoRA layer and torch.compile of the reference formula, timed interleaved in one run.

    python benchmarks/kernels/bench_lora_linear.py                 # CPU target shape, fp32
    python benchmarks/kernels/bench_lora_linear.py --device cuda   # 8192 x 4096 -> 4096, r=16, bf16

Backward computes dx (the base layer is frozen, as in LoRA training) and the LoRA gradients. The base
linear's forward + backward is cuBLAS's pair of GEMMs on the same shapes: "vs baseline" is the fraction
of cuBLAS's throughput the LoRA layer keeps.
Target (CPU, 512 x 768 -> 768, r=8, fp32): <= 1.15x the base linear's time, <= 1.25x with dropout 0.1.
Target (GPU, 8192 x 4096 -> 4096, r=16, bf16): peftmed triton <= 1.10x the base GEMM pair and >= 1.3x
faster than peft's LoRA layer (``--targets-json`` writes them for benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, percentiles, print_expected, report, row, target, time_interleaved, write_targets  # noqa: E402

from peftmed.methods.lora import LoraConfig, LoraLinear  # noqa: E402


def peft_layer(base: nn.Linear, r: int, alpha: float, dropout: float):
    from peft import LoraConfig as PeftConfig
    from peft.tuners.lora import Linear as PeftLinear

    cfg = PeftConfig(r=r, lora_alpha=alpha, lora_dropout=dropout)
    layer = PeftLinear(base, "default", config=cfg, r=r, lora_alpha=alpha, lora_dropout=dropout)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.02)  # a trained-looking B, as for ours
    return layer


def peftmed_layer(base: nn.Linear, r: int, alpha: float, dropout: float, impl: str):
    layer = LoraLinear(base)
    layer.add_adapter("default", LoraConfig(r=r, alpha=alpha, dropout=dropout, kernel=impl), "attn.q")
    layer.active_adapter = "default"
    nn.init.normal_(layer.lora_B["default"], std=0.02)
    return layer


def step(layer, x, dy):
    """One forward + backward without accumulating into .grad (so no provider pays an extra add)."""
    params = [p for p in layer.parameters() if p.requires_grad]

    def run():
        out = layer(x)
        torch.autograd.grad(out, [x, *params], dy)

    return run


def flops(t: int, d_in: int, d_out: int, r: int, lora: bool) -> int:
    base = 2 * 2 * t * d_in * d_out  # y and dx
    return base + (6 * 2 * t * r * (d_in + d_out) // 2 if lora else 0)


def _params(args):
    gpu = args.device == "cuda"
    t = args.tokens or (8192 if gpu else 512)
    d = args.features or (4096 if gpu else 768)
    r = args.rank or (16 if gpu else 8)
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    return gpu, t, d, r, dtype


def _names(args, p: float) -> dict[str, tuple[str, str]]:
    """The targets one dropout's rows record: key -> (name, goal)."""
    gpu, t, d, r, dtype = _params(args)
    best = "peftmed triton" if gpu else "peftmed cpp"
    limit = 1.10 if gpu else (1.15 if p == 0 else 1.25)
    shape = f"{t}x{d}->{d} r={r} {str(dtype)[6:]} dropout {p}"
    names = {"pair": (f"LoRA {best} fwd+bwd / base GEMM pair, {shape}", f"<= {limit}x")}
    if gpu:
        names["peft"] = (f"LoRA peft / {best} time, {shape}", ">= 1.3x")
        names["persistent"] = (f"LoRA peftmed triton_persistent fwd+bwd / base GEMM pair, {shape}", f"<= {limit}x")
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--features", type=int, help="in = out features")
    ap.add_argument("--rank", type=int)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (slow to build)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "kernels")
    ap.add_argument("--targets-json", type=Path, help="append the targets' figures here (JSON list)")
    ap.add_argument("--list-targets", action="store_true", help="print the targets these arguments record, run nothing")
    args = ap.parse_args()
    if args.list_targets:
        print_expected([x for p in args.dropout for x in _names(args, p).values()])
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu, t, d, r, dtype = _params(args)
    # triton_persistent: the persistent TMA design (asked for by name; auto does not pick it until it is measured)
    impls = ["triton", "triton_persistent", "cuda", "torch"] if gpu else ["cpp", "torch"]
    alpha = 2.0 * r

    torch.manual_seed(0)
    rows = []
    for p in args.dropout:
        base = nn.Linear(d, d, device=args.device, dtype=dtype).requires_grad_(False)
        x = torch.randn(t, d, device=args.device, dtype=dtype, requires_grad=True)
        dy = torch.randn(t, d, device=args.device, dtype=dtype)
        fns = {"base linear (frozen)": step(base, x, dy)}
        try:  # a peft API change (or no peft) loses the peft row, not the benchmark
            fns["peft LoRA"] = step(peft_layer(base, r, alpha, p), x, dy)
        except Exception as exc:
            print(f"skipping peft's LoRA layer: {type(exc).__name__}: {exc}", file=sys.stderr)
        for impl in impls:
            layer = peftmed_layer(base, r, alpha, p, impl)
            layer.train()
            try:
                step(layer, x, dy)()
            except Exception as exc:  # an implementation that cannot run here is reported, not fatal
                print(f"skipping peftmed {impl}: {exc}", file=sys.stderr)
                continue
            fns[f"peftmed {impl}"] = step(layer, x, dy)
        if not args.no_compile:
            a = (torch.randn(r, d, device=args.device, dtype=dtype) * 0.02).requires_grad_()
            b = (torch.randn(d, r, device=args.device, dtype=dtype) * 0.02).requires_grad_()
            s = alpha / r

            @torch.compile
            def compiled(x):
                h = F.dropout(x, p, True) if p > 0 else x
                return F.linear(x, base.weight, base.bias) + s * F.linear(F.linear(h, a), b)

            def run_compiled():
                torch.autograd.grad(compiled(x), [x, a, b], dy)

            run_compiled()  # compile outside the timed rounds
            fns["torch.compile(reference)"] = run_compiled
        times = time_interleaved(fns, device=args.device, rounds=args.rounds)
        base_p50 = percentiles(times["base linear (frozen)"])[1]
        mode = f"fwd+bwd, dropout {p}"
        for name, samples in times.items():
            p50 = percentiles(samples)[1]
            tflops = flops(t, d, d, r, name != "base linear (frozen)") / (p50 * 1e-3) / 1e12
            rows.append(row(f"{t}x{d}->{d} r={r}", dtype, mode, name, samples, args.device,
                            f"{tflops:.3f} TFLOP/s", None if name.startswith("base") else base_p50))
        best = "peftmed triton" if gpu else "peftmed cpp"
        names = _names(args, p)
        if best in times:
            ours = percentiles(times[best])[1]
            limit = 1.10 if gpu else (1.15 if p == 0 else 1.25)
            target(names["pair"][0], ours / base_p50, names["pair"][1], ours / base_p50 <= limit, "x")
            if gpu and "peft LoRA" in times:
                peft_p50 = percentiles(times["peft LoRA"])[1]
                target(names["peft"][0], peft_p50 / ours, names["peft"][1], peft_p50 / ours >= 1.3, "x")
            if gpu and "peftmed triton_persistent" in times:  # the design meant to reach the base GEMM pair
                mine = percentiles(times["peftmed triton_persistent"])[1]
                target(names["persistent"][0], mine / base_p50, names["persistent"][1], mine / base_p50 <= limit, "x")
    report("lora_linear", rows, args.out)
    write_targets(args.targets_json)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
