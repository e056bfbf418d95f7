"""LoRA and LayerNorm-tuning on every tiny vision-language family, peftmed beside huggingface/peft on the same model.

    python benchmarks/families.py [--steps 60] [--warmup 5] [--only qwen2-vl ...]

For each family (the tiny random model peftmed builds) and each recipe, both implementations train the same model
(the same weights, batch and AdamW settings): ``--warmup`` steps each (first calls: extension loading, dispatch
decisions, allocator growth), then ``--steps`` timed steps each, one of each in turn and the order swapped every
pair (peftmed, peft, peft, peftmed, ...), so that load on the machine and cache state hit both alike; half the pairs
with peftmed's model built first, half with peft's (whichever model is built first runs 1-2% slower on this CPU, as
an A/A run of peft against peft shows). The step time
is the median of each; "step x" is the median of the pairs' ratios (each pair ran back to back), with its 95%
interval over the pairs (bootstrap) beside it. Memory is the peak of the allocator's own records (torch.profiler, profile_memory) over one
training step, plus what the parameters and optimizer states hold. Prints a table and, per row, whether the loss
fell over the steps. Targets: step time x peft <= 1.0, memory x peft <= 1.0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

RECIPES = {"lora": "llm=lora(r=8,alpha=16)", "layernorm": "vision=layernorm llm=layernorm"}


def _peak_step_bytes(step) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    running = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def _interval(ratios: list[float]) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of ``ratios`` (scipy's; seeded)."""
    import numpy as np
    from scipy.stats import bootstrap

    res = bootstrap((np.asarray(ratios),), np.median, confidence_level=0.95, n_resamples=2000, method="percentile",
                    rng=np.random.default_rng(0))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _setup(kind: str, family: str, recipe: str, registry):
    import peftmed
    from peftmed.baselines.hf_peft import apply_peft

    backbone = registry.backbone(family)
    model = backbone.build()
    if kind == "peftmed":
        model = peftmed.apply(model, recipe, registry=registry)
    else:
        model = apply_peft(model, recipe, backbone, registry)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = (model.base_model if kind == "peftmed" else model).example_inputs(4)[0]
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model.compute_loss(batch) if kind == "peftmed" else model(batch)["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())

    held = [*model.parameters()]
    return step, losses, sum(p.numel() for p in params), sum(p.numel() for p in held), opt, held


def main() -> int:
    import peftmed
    from peftmed.backbones.hf.families import FAMILIES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per implementation first")
    p.add_argument("--only", nargs="*", help="families to run")
    args = p.parse_args()
    torch.set_num_threads(1)
    registry = peftmed.default_registry()
    families = args.only or [f for f in sorted(FAMILIES) if f != "smolvlm"]
    print(f"torch {torch.__version__}, 1 thread, {args.warmup} + {args.steps} steps per implementation, interleaved")
    header = (f"{'family':16s} {'recipe':10s} {'trainable':>9s} {'%':>6s} {'step ms':>8s} {'peft ms':>8s} "
              f"{'step x':>7s} {'95% interval':>13s} {'mem MiB':>8s} {'peft MiB':>8s} {'mem x':>6s}  "
              f"loss first->last (peftmed | peft)")
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    worst_time = worst_mem = 0.0
    for family in families:
        for name, recipe in RECIPES.items():
            times = {"peftmed": [], "peft": []}
            ratios: list[float] = []
            # the model built first runs 1-2% slower here whichever it is (an A/A run shows it: memory placement),
            # so each order gets half the pairs and the ratios of both are pooled
            for first in ("peftmed", "peft"):
                built = {kind: _setup(kind, family, recipe, registry)
                         for kind in ((first, "peft") if first == "peftmed" else (first, "peftmed"))}
                ours, theirs = built["peftmed"], built["peft"]
                for _ in range(args.warmup):
                    ours[0]()
                    theirs[0]()
                session = {"peftmed": [], "peft": []}
                for i in range(args.steps // 2):
                    pair = (("peftmed", ours), ("peft", theirs))
                    for kind, (step, *_rest) in pair if i % 2 == 0 else pair[::-1]:
                        t0 = time.perf_counter()
                        step()
                        session[kind].append(time.perf_counter() - t0)
                ratios += [a / b for a, b in zip(session["peftmed"], session["peft"])]
                for kind in times:
                    times[kind] += session[kind]
            low, high = _interval(ratios)
            mem = {}
            for kind, (step, _losses, _n, _total, opt, held) in (("peftmed", ours), ("peft", theirs)):
                states = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
                base = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                            for t in held + states}.values())
                mem[kind] = (base + _peak_step_bytes(step)) / 2**20
            ms = {k: statistics.median(v) * 1000 for k, v in times.items()}
            tx, mx = statistics.median(ratios), mem["peftmed"] / mem["peft"]
            worst_time, worst_mem = max(worst_time, tx), max(worst_mem, mx)
            lo, lt = ours[1], theirs[1]
            print(f"{family:16s} {name:10s} {ours[2]:9,d} {100 * ours[2] / ours[3]:6.2f} {ms['peftmed']:8.1f} "
                  f"{ms['peft']:8.1f} {tx:7.2f} {f'{low:.2f}-{high:.2f}':>13s} {mem['peftmed']:8.1f} {mem['peft']:8.1f} {mx:6.2f}  "
                  f"{lo[0]:.3f}->{lo[-1]:.3f} {'falls' if lo[-1] < lo[0] else 'DOES NOT FALL'} | "
                  f"{lt[0]:.3f}->{lt[-1]:.3f}")
    print(f"worst step time x peft: {worst_time:.2f} (target <= 1.0); worst memory x peft: {worst_mem:.2f} "
          f"(target <= 1.0); {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
