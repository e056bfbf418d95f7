"""``peftmed kernels``: every kernel op's implementations, whether each can run here, and what auto picks."""

from __future__ import annotations

import argparse
import json

from ..hookspecs import hookimpl
from ..kernels import build
from ..kernels.registry import KernelCall, implementations
from ..plugins import default_registry
from . import Command, table


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--build", action="store_true",
                   help="compile every C++ extension (and, with a CUDA torch, every CUDA one) now")
    p.add_argument("--json", action="store_true", help="print JSON")


def _auto_choice(op: str, device: str, registry) -> str:
    """What impl='auto' would pick for fp32 on ``device``, without compiling anything to find out."""
    import torch


    for impl in implementations(op, registry):
        if impl.refuses(KernelCall(device, torch.float32)) is None and impl.available()[0]:
            return impl.name
    return "none"


def build_all(registry) -> list[tuple[str, str, str | None]]:
    """Compile every extension of ``build.EXTENSIONS`` this machine can compile: (op, impl, error or None)."""
    done = []
    for name, spec in build.EXTENSIONS.items():
        impl_name = "cuda" if spec["cuda"] else "cpp"
        ok, why = build.can_compile(cuda=spec["cuda"])
        if not ok:
            done.append((spec["op"], impl_name, f"skipped: {why}"))
            continue
        build.forget_failure(name)
        impl = next((k for k in implementations(spec["op"], registry) if k.name == impl_name), None)
        try:
            impl.load() if impl is not None else build.load_extension(name)
            done.append((spec["op"], impl_name, None))
        except Exception as exc:
            done.append((spec["op"], impl_name, str(exc)))
    return done


def _run(args) -> int:
    import torch


    registry = default_registry()
    failed = 0
    if args.build:
        for op, impl, error in build_all(registry):
            if error is None:
                print(f"built {op}:{impl}")
            else:
                failed += not error.startswith("skipped")
                print(f"{'FAILED' if not error.startswith('skipped') else 'not built'} {op}:{impl}: {error}")
    ops = sorted({k.op for k in registry.all("kernel").values()})
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows, data = [], []
    for op in ops:
        auto = {d: _auto_choice(op, d, registry) for d in devices}
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
        print(table(rows, ["op", "impl", "priority", "devices", "available", "auto picks on", "from", "notes"]))
        print(f"\nsources: {build.CSRC}\nbuild cache: {build.cache_root()}")
    return 1 if failed else 0


@hookimpl
def register_commands(register):
    register(Command(name="kernels", help="list kernel ops, their implementations and which run here",
                     configure=_configure, run=_run,
                     description="List every kernel op's implementations, whether each can run here (and "
                                 "why not), and which one impl='auto' picks. --build compiles the C++ "
                                 "(and CUDA) kernels now instead of on first use."))
