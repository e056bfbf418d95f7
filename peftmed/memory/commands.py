"""``peftmed plan``: weights, gradients, optimizer states and activations of a training step, per component,
against a GPU's memory, with the largest batch that fits."""

from __future__ import annotations

import argparse
import json
import math

from ..cli import Command, positive_int
from ..errors import ConfigError
from ..hookspecs import hookimpl
from ..options import parse_key_values
from ..runtime import resolve_device
from .plan import plan_memory

GIB = 1024**3


def _configure(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Estimate the memory of one training step before starting it: per component the weights (by\n"
        "--base-dtype and --quantize), gradients and AdamW states of what trains, and the activations\n"
        "(measured on shallower copies of the model at the real widths, lengths and batch size, then\n"
        "extrapolated in depth; see docs/memory.md). With --gpu-gb: whether it fits and the largest batch.\n\n"
        "example:\n"
        "  peftmed plan --backbone llava-med-7b --recipe 'vision=layernorm llm=lora(r=8)' --batch-size 4 \\\n"
        "      --base-dtype bf16 --grad-checkpoint llm --quantize nf4 --seq-len 64 --gpu-gb 24")
    p.add_argument("--backbone", "-b", required=True, help="a registered backbone (see 'peftmed backbones')")
    p.add_argument("--recipe", "-r", required=True, help="e.g. 'vision=lora(r=8) llm=lora(r=16)'")
    p.add_argument("--batch-size", type=positive_int, default=1, help="samples per step [default: 1]")
    p.add_argument("--base-dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="dtype of the frozen weights [default: fp32]")
    p.add_argument("--grad-checkpoint", metavar="COMPONENTS", help="checkpointed components (comma list or all)")
    p.add_argument("--quantize", choices=["none", "nf4"], default="none", help="4-bit frozen linear weights")
    p.add_argument("--quantize-components", metavar="COMPONENTS", help="what --quantize applies to [default: llm]")
    p.add_argument("--seq-len", type=positive_int, default=32, help="question tokens per sample [default: 32]")
    p.add_argument("--answer-len", type=positive_int, default=8, help="answer tokens per sample [default: 8]")
    p.add_argument("--image-size", type=positive_int, help="image side in pixels [default: the backbone's]")
    p.add_argument("--gpu-gb", type=float, help="the GPU's memory in GB (e.g. 24, 40, 80)")
    p.add_argument("--reserve-gb", type=float, default=1.0,
                   help="kept free for the CUDA context and allocator fragmentation [default: 1.0]")
    p.add_argument("--backbone-options", action="append", default=[], metavar="KEY=VALUE",
                   help="a builder option (repeatable), as in 'peftmed train'")
    p.add_argument("--device", default="cpu", help="where the shallow copies are measured [default: cpu]")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


# What plan measures activations at (a shallow copy at this batch, length and image size really runs): bounds
# that keep a typo from exhausting this machine's memory, with room beyond any real training step.
LIMITS = {"batch_size": 4096, "seq_len": 32768, "answer_len": 32768, "image_size": 4096}
GPU_GB_MAX = 100_000  # 100 TB: beyond any single accelerator
LARGEST_BATCH_SHOWN = 1 << 20


def check_plan_arguments(args) -> None:
    """Every number plan takes, checked before anything is built: the error names the flag and the value."""
    for name, limit in LIMITS.items():
        value = getattr(args, name)
        if value is not None and not (1 <= value <= limit):
            raise ConfigError(f"--{name.replace('_', '-')} must be a whole number from 1 to {limit:,} (plan measures a "
                              f"training step at that size), got {value}")
    if args.gpu_gb is not None and not (0 < args.gpu_gb <= GPU_GB_MAX):
        raise ConfigError(f"--gpu-gb must be a GPU's memory in GB, more than 0 and at most {GPU_GB_MAX:,}, "
                          f"got {args.gpu_gb}")
    if not (math.isfinite(args.reserve_gb) and args.reserve_gb >= 0):
        raise ConfigError(f"--reserve-gb must be 0 or more GB, got {args.reserve_gb}")
    if args.gpu_gb is not None and args.reserve_gb >= args.gpu_gb:
        raise ConfigError(f"--reserve-gb {args.reserve_gb:g} leaves nothing of --gpu-gb {args.gpu_gb:g}")
    resolve_device(args.device)


def _run(args) -> int:
    check_plan_arguments(args)
    plan = plan_memory(args.backbone, args.recipe, batch_size=args.batch_size, seq_len=args.seq_len,
                       answer_len=args.answer_len, image_size=args.image_size, base_dtype=args.base_dtype,
                       grad_checkpoint=args.grad_checkpoint, quantize=args.quantize,
                       quantize_components=args.quantize_components,
                       backbone_options=parse_key_values(args.backbone_options, "--backbone-options"),
                       device=args.device)
    data = plan.to_dict()
    status = 0
    lines = []
    if args.gpu_gb:
        gpu, reserve = args.gpu_gb * GIB, args.reserve_gb * GIB
        data["gpu_gb"] = args.gpu_gb
        data["largest_batch"] = min(plan.largest_batch(gpu, reserve), LARGEST_BATCH_SHOWN)
        if plan.weights + reserve > gpu:
            status = 1
            lines.append(f"does not fit: the weights alone take {plan.weights / GIB:.2f} GB of the {args.gpu_gb:g} GB "
                         f"(+{args.reserve_gb:g} GB reserve). " + _alternatives(args, plan))
        elif plan.total + reserve > gpu:
            status = 1
            lines.append(f"does not fit at batch {plan.batch_size}: {plan.total / GIB:.2f} GB + {args.reserve_gb:g} GB "
                         f"reserve > {args.gpu_gb:g} GB; "
                         + (f"the largest batch that fits is {data['largest_batch']}"
                            if data["largest_batch"] else "no batch fits: " + _alternatives(args, plan)))
        else:
            most = data["largest_batch"]
            lines.append(f"fits: {plan.total / GIB:.2f} GB + {args.reserve_gb:g} GB reserve of {args.gpu_gb:g} GB; the "
                         f"largest batch that fits is " + (f"about {most:,}" if most < LARGEST_BATCH_SHOWN else
                                                            f"more than {LARGEST_BATCH_SHOWN:,}"))
    if args.json:
        print(json.dumps(data, indent=2))
        return status
    print(plan.table())
    print(f"activations: measured at depths {', '.join(_depths(d) for d in plan.measured_depths)} and extrapolated "
          f"to {_depths(plan.depths)}")
    for line in lines:
        print(line)
    return status


def _depths(d: dict) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in d.items()) + ")"


def _alternatives(args, plan) -> str:
    """Weights under the memory options this plan does not use yet."""
    if not plan.alternatives:
        return "nothing smaller is available: a larger GPU, or a recipe that trains less"
    return "with " + "; ".join(f"{label}: weights {weights / GIB:.2f} GB" for label, weights in plan.alternatives.items())


@hookimpl
def register_commands(register):
    register(Command("plan", "estimate a training step's memory per component; will it fit on my GPU?",
                     _configure, _run))
