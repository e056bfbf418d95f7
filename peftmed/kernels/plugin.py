"""Built-in kernel implementations and the ``peftmed kernels`` command (a plugin like any other).

Each op gets ``torch`` (reference, everywhere), ``cpp`` (CPU, compiled on first use), ``cuda``
(compiled on first use where torch has CUDA) and ``triton`` (GPU; on CPU only when asked for by name
with TRITON_INTERPRET=1, which is how the tests run it). A third party registers a ``KernelImpl`` for
an op the same way, with a higher priority to make ``auto`` prefer it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os

import torch

from ..cli import Command
from ..hookspecs import hookimpl
from . import build
from .registry import KernelImpl, implementations

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
OPS = ("lora_linear", "layer_norm")
PRIORITY = {"triton": 30, "cuda": 20, "cpp": 10, "torch": 0}
TRITON_MAX = {"lora_linear": 128, "layer_norm": 65536}  # rank / row width one program can hold


def _module_fns(module: str):
    mod = importlib.import_module(module)
    fns = {"forward": mod.forward, "backward": mod.backward}
    if hasattr(mod, "needs_out"):  # optional: (inputs, p) -> whether backward reads the forward's output
        fns["needs_out"] = mod.needs_out
    return fns


def _extension_fns(name: str, *, cuda: bool):
    ext = build.load_extension(name)
    if not cuda:
        return {"forward": ext.forward, "backward": ext.backward}

    def stream() -> int:  # .cu launchers take the current stream (no c10/cuda headers there)
        return torch.cuda.current_stream().cuda_stream

    return {"forward": lambda *a: ext.forward(*a, stream()), "backward": lambda *a: ext.backward(*a, stream())}


def _triton_check() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run it interpreted)"
    return True, ""


def _triton_cpu() -> tuple[str, ...]:
    return ("cpu",) if os.environ.get("TRITON_INTERPRET") == "1" else ()


def _max_size(op: str):
    limit = TRITON_MAX[op]
    what = "rank" if op == "lora_linear" else "row width"
    return lambda size: None if size <= limit else f"{what} {size} is above the Triton kernel's {limit}"


# Measured on an idle 2-core CPU (benchmarks/kernels/README.md): the C++ LayerNorm is 1.2x slower than
# torch's native one (both near the memory-bandwidth floor), so auto keeps native there; the C++ op
# stays available by name (impl="cpp"). The C++ LoRA is auto's CPU pick with and without dropout.
CPP_PRIORITY = {"layer_norm": PRIORITY["torch"] - 10}


def builtin_impls() -> list[KernelImpl]:
    impls = []
    for op in OPS:
        impls += [
            KernelImpl(op, "torch", PRIORITY["torch"], ("cpu", "cuda"), FLOATS + (torch.float64,),
                       loader=lambda op=op: _module_fns(f"peftmed.kernels.{op}.reference"),
                       description="PyTorch reference (fallback and test oracle)"),
            KernelImpl(op, "cpp", CPP_PRIORITY.get(op, PRIORITY["cpp"]), ("cpu",), FLOATS,
                       loader=lambda op=op: _extension_fns(f"{op}_cpu", cuda=False),
                       check=lambda op=op: build.extension_status(f"{op}_cpu"),
                       description=f"C++ (csrc/{op}/{op}.cpp), compiled on first use"),
            KernelImpl(op, "cuda", PRIORITY["cuda"], ("cuda",), FLOATS,
                       loader=lambda op=op: _extension_fns(f"{op}_cuda", cuda=True),
                       check=lambda op=op: build.extension_status(f"{op}_cuda"),
                       description=f"CUDA (csrc/{op}/{op}.cu), compiled on first use"),
            KernelImpl(op, "triton", PRIORITY["triton"], ("cuda",), FLOATS,
                       loader=lambda op=op: _module_fns(f"peftmed.kernels.{op}.triton_impl"),
                       check=_triton_check, accepts=_max_size(op), explicit_devices=_triton_cpu,
                       description=f"Triton (peftmed/kernels/{op}/triton_impl.py)"),
        ]
    return impls


@hookimpl
def register_kernels(register):
    for impl in builtin_impls():
        register(impl)


# ---- peftmed kernels -----------------------------------------------------------------------------
def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--build", action="store_true", help="compile the C++ (and, with CUDA, CUDA) kernels now")
    p.add_argument("--json", action="store_true", help="print JSON")


def _auto_choice(op: str, device: str) -> str:
    """What impl='auto' would pick for fp32 on ``device``, without compiling anything to find out."""
    for impl in implementations(op):
        if impl.reject_reason(device, torch.float32, None, explicit=False) is None and impl.available()[0]:
            return impl.name
    return "none"


def _run(args) -> int:
    from .registry import _registry

    if args.build:
        for op in OPS:
            for impl in implementations(op):
                if impl.name in ("cpp", "cuda") and build.can_compile(cuda=impl.name == "cuda")[0]:
                    build.forget_failure(f"{op}_{'cpu' if impl.name == 'cpp' else 'cuda'}")
                    try:
                        impl.load()
                        print(f"built {op}:{impl.name}")
                    except Exception as exc:
                        print(f"FAILED {op}:{impl.name}: {exc}")
    registry = _registry()
    ops = sorted({k.op for k in registry.all("kernel").values()})
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows, data = [], []
    for op in ops:
        auto = {d: _auto_choice(op, d) for d in devices}
        for impl in implementations(op, registry):
            ok, why = impl.available()
            owner = registry.owner("kernel", f"{op}:{impl.name}")
            source = "built-in" if owner is None or owner.builtin else f"{owner.distribution} {owner.version}"
            picked = ",".join(d for d in devices if auto[d] == impl.name)
            rows.append([op, impl.name, impl.priority, "/".join(impl.devices) or "-", "yes" if ok else "no",
                         picked or "-", source, why or impl.description])
            data.append({"op": op, "impl": impl.name, "priority": impl.priority, "devices": list(impl.devices),
                         "dtypes": [str(d).replace("torch.", "") for d in impl.dtypes], "available": ok,
                         "why_not": why, "auto_on": picked.split(",") if picked else [], "plugin": source,
                         "loaded": impl.loaded})
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        from ..cli.core_commands import _table

        print(_table(rows, ["op", "impl", "priority", "devices", "available", "auto picks on", "from", "notes"]))
        print(f"\nbuild cache: {build.cache_root()}")
    return 0


@hookimpl
def register_commands(register):
    register(Command(name="kernels", help="list kernel ops, their implementations and which run here",
                     configure=_configure, run=_run,
                     description="List every kernel op's implementations, whether each can run here (and "
                                 "why not), and which one impl='auto' picks. --build compiles the C++ "
                                 "kernels now instead of on first use."))
