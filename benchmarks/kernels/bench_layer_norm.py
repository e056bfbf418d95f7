"""LayerNorm forward + backward (dx, dgamma, dbeta): peftmed's implementations against torch's native
layer_norm and torch.compile of it, timed interleaved in one run, with a contiguous upstream gradient.

    python benchmarks/kernels/bench_layer_norm.py                  # CPU: 2048 x 768, fp32
    python benchmarks/kernels/bench_layer_norm.py --device cuda    # 32768 x {768, 1024}, bf16 and fp32

Target (CPU, 2048 x 768, fp32): at least 1.3x faster than torch native. On a GPU the backward alone is
also timed against a device-to-device copy of the same bytes. GPU targets (N = 768 and 1024): the Triton
backward at >= 80% of the measured copy bandwidth, fwd+bwd faster than torch and torch.compile
(``--targets-json`` writes them for benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, percentiles, print_expected, report, row, target, time_interleaved, write_targets  # noqa: E402

from peftmed import kernels  # noqa: E402


def _params(args):
    gpu = args.device == "cuda"
    rows_n = args.rows or (32768 if gpu else 2048)
    widths = args.widths or ([768, 1024] if gpu else [768])
    dtypes = [getattr(torch, d) for d in (args.dtypes or (["bfloat16", "float32"] if gpu else ["float32"]))]
    return gpu, rows_n, widths, dtypes


def _fwd_target(other: str, gpu: bool, what: str) -> tuple[str, str]:
    best = "peftmed triton" if gpu else "peftmed cpp"
    return f"LayerNorm fwd+bwd {other} / {best} time, {what}", ">= 1.3x" if not gpu and other == "torch native" else "> 1x"


def _bwd_target(rows_n: int, n: int, dtype) -> tuple[str, str]:
    return f"LayerNorm backward (triton) share of copy bandwidth, {rows_n}x{n} {str(dtype)[6:]}", ">= 80%"


def _expected(args) -> list[tuple[str, str]]:
    gpu, rows_n, widths, dtypes = _params(args)
    others = ["torch native"] + ([] if args.no_compile else ["torch.compile(native)"])
    out = []
    for dtype in dtypes:
        for n in widths:
            out += [_fwd_target(other, gpu, f"{rows_n}x{n} {str(dtype)[6:]}") for other in others]
            out += [_bwd_target(rows_n, n, dtype)] if gpu else []
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rows", type=int)
    ap.add_argument("--widths", type=int, nargs="+")
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (slow to build)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "kernels")
    ap.add_argument("--targets-json", type=Path, help="append the targets' figures here (JSON list)")
    ap.add_argument("--list-targets", action="store_true", help="print the targets these arguments record, run nothing")
    args = ap.parse_args()
    if args.list_targets:
        print_expected(_expected(args))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu, rows_n, widths, dtypes = _params(args)
    impls = ["triton", "cuda", "torch"] if gpu else ["cpp", "torch"]

    torch.manual_seed(0)
    out_rows = []
    for dtype in dtypes:
        for n in widths:
            x = torch.randn(rows_n, n, device=args.device, dtype=dtype, requires_grad=True)
            w = (1 + 0.1 * torch.randn(n, device=args.device, dtype=dtype)).requires_grad_()
            b = torch.zeros(n, device=args.device, dtype=dtype, requires_grad=True)
            dy = torch.randn(rows_n, n, device=args.device, dtype=dtype)

            def step(fn):
                def run():
                    torch.autograd.grad(fn(x), [x, w, b], dy)

                return run

            fns = {"torch native": step(lambda t: F.layer_norm(t, (n,), w, b))}
            for impl in impls:
                fn = lambda t, impl=impl: kernels.layer_norm(t, w, b, impl=impl)  # noqa: E731
                try:
                    step(fn)()
                except Exception as exc:  # an implementation that cannot run here is reported, not fatal
                    print(f"skipping peftmed {impl}: {exc}", file=sys.stderr)
                    continue
                fns[f"peftmed {impl}"] = step(fn)
            if not args.no_compile:
                compiled = torch.compile(lambda t: F.layer_norm(t, (n,), w, b))
                step(compiled)()  # compile outside the timed rounds
                fns["torch.compile(native)"] = step(compiled)
            if gpu:  # the bandwidth ceiling: a copy moving as many bytes (read + write) as fwd+bwd
                src = torch.empty(5 * rows_n * n // 2, device=args.device, dtype=dtype)
                dst = torch.empty_like(src)
                fns["copy (same bytes)"] = lambda: dst.copy_(src)
            times = time_interleaved(fns, device=args.device, rounds=args.rounds)
            base = percentiles(times["torch native"])[1]
            moved = 5 * rows_n * n * x.element_size()  # fwd: x in, y out; bwd: x, dy in, dx out
            for name, samples in times.items():
                p50 = percentiles(samples)[1]
                nbytes = moved  # the copy moves the same bytes by construction
                out_rows.append(row(f"{rows_n}x{n}", dtype, "fwd+bwd", name, samples, args.device,
                                    f"{nbytes / (p50 * 1e-3) / 1e9:.1f} GB/s",
                                    None if name == "torch native" else base))
            best = "peftmed triton" if gpu else "peftmed cpp"
            if best in times:
                ours = percentiles(times[best])[1]
                what = f"{rows_n}x{n} {str(dtype)[6:]}"
                others = [k for k in ("torch native", "torch.compile(native)") if k in times]
                for other in others:
                    ratio = percentiles(times[other])[1] / ours
                    name, goal = _fwd_target(other, gpu, what)
                    target(name, ratio, goal, ratio >= 1.3 if goal == ">= 1.3x" else ratio > 1.0, "x")
            if gpu:
                out_rows += backward_only(rows_n, n, dtype, impls, args)
    report("layer_norm", out_rows, args.out)
    write_targets(args.targets_json)


def backward_only(rows_n: int, n: int, dtype, impls, args) -> list[dict]:
    """GPU: the backward alone (dx, dgamma, dbeta) against the copy bandwidth of the same bytes."""
    x = torch.randn(rows_n, n, device="cuda", dtype=dtype)
    w = torch.ones(n, device="cuda", dtype=dtype)
    dy = torch.randn_like(x)
    mean, rstd = torch.zeros(rows_n, device="cuda"), torch.ones(rows_n, device="cuda")
    src = torch.empty(3 * rows_n * n // 2, device="cuda", dtype=dtype)  # read + write = backward's x, dy, dx
    dst = torch.empty_like(src)
    fns = {"copy (same bytes)": lambda: dst.copy_(src)}
    native_mean, native_rstd = torch.zeros(rows_n, 1, device="cuda"), torch.ones(rows_n, 1, device="cuda")
    fns["torch native"] = lambda: torch.ops.aten.native_layer_norm_backward(
        dy, x, [n], native_mean, native_rstd, w, w, [True, True, True])
    for impl in impls:
        try:
            _, loaded = kernels.resolve("layer_norm", impl, "cuda", dtype, n)
        except Exception as exc:
            print(f"skipping peftmed {impl} backward: {exc}", file=sys.stderr)
            continue
        fns[f"peftmed {impl}"] = lambda f=loaded["backward"]: f(dy, x, w, mean, rstd, (True, True, True))
    times = time_interleaved(fns, device="cuda", rounds=args.rounds)
    copy_p50 = percentiles(times["copy (same bytes)"])[1]
    nbytes = 3 * rows_n * n * x.element_size()
    if "peftmed triton" in times:
        frac = copy_p50 / percentiles(times["peftmed triton"])[1]
        name, goal = _bwd_target(rows_n, n, dtype)
        target(name, 100 * frac, goal, frac >= 0.8, "%")
    return [row(f"{rows_n}x{n}", dtype, "bwd only", name, samples, "cuda",
                f"{nbytes / (percentiles(samples)[1] * 1e-3) / 1e9:.1f} GB/s",
                None if name.startswith("copy") else copy_p50) for name, samples in times.items()]


if __name__ == "__main__":
    main()
