"""Kernel implementations (:class:`KernelImpl`) and the dispatch that picks one per call.

Every op (``lora_linear``, ``layer_norm``, ...) has several implementations registered through the
``register_kernels`` hook; the built-in ones are in :mod:`peftmed.kernels.plugin`. Dispatch uses the
registry a model was applied with (it travels with the adapter layers), else the default one. A call asks for
``impl="auto" | "<name>"``:

- ``auto`` (or ``None``) tries the implementations that fit the device, dtype and size in priority
  order (higher first) and takes the first that is available and loads (a C++ extension compiles on
  first use). Skipped ones are logged once per (op, device, dtype, size); a build failure is logged
  as a warning with the compiler's first error line.
- a name must work, or :class:`KernelUnavailableError` says why (device, dtype, size, build log).

Environment overrides (they replace ``auto``; an explicit name passed by code wins):
  PEFTMED_KERNEL_IMPL=torch              every op
  PEFTMED_KERNEL_IMPL_LORA_LINEAR=cpp    one op (upper-cased op name)

Decisions are cached, so a call costs a dict lookup after the first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import PeftmedError, UnknownNameError
from ..plugins import default_registry

log = logging.getLogger("peftmed.kernels")

AUTO = "auto"


class KernelUnavailableError(PeftmedError, RuntimeError):
    """An implementation asked for by name cannot run here (device, dtype, size or build failure)."""


class KernelInputError(PeftmedError, ValueError):
    """Inputs a kernel op cannot take (mismatched dtypes or devices)."""


def _always() -> tuple[bool, str]:
    return True, ""


@dataclass(frozen=True)
class KernelCall:
    """What dispatch knows of a call when it picks an implementation."""

    device: str  # torch device type: "cpu", "cuda", "meta"
    dtype: torch.dtype
    size: int | None = None  # the size that limits the op's kernels: LoRA rank, LayerNorm row width, head dim
    explicit: bool = False  # asked for by name (not by auto)


# one limit of an implementation: None if the call fits, else why not (a sentence a user reads)
Limit = Callable[[KernelCall], "str | None"]


def refusal(limits: Sequence[Limit], call: KernelCall) -> str | None:
    """The first limit's reason to refuse ``call``, None if every limit lets it through."""
    for limit in limits:
        why = limit(call)
        if why:
            return why
    return None


@dataclass(eq=False)
class KernelImpl:
    """One implementation of one op; it answers two questions.

    - :meth:`available`: can it run on this machine at all (``check``: cheap, compiles nothing)?
    - :meth:`refuses`: does it take this call (a :class:`KernelCall`)? It runs on ``devices`` in ``dtypes``, within
      each of its ``limits`` (a size bound, fp32 stopping lower on a GPU, a device it takes only when asked by name).

    ``load()`` returns the op-specific callables (for the built-in ops: ``forward`` and ``backward``, whose signatures
    are documented in each op's ``reference.py``); it may compile code and raise.
    """

    op: str  # op name, e.g. "lora_linear"
    name: str  # implementation name, e.g. "cpp"
    priority: int  # auto tries higher first
    devices: tuple[str, ...]  # torch device types it runs on ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...]  # supported input dtypes
    loader: Callable[[], Mapping[str, Callable]]  # returns {"forward": ..., "backward": ...}
    check: Callable[[], tuple[bool, str]] = _always  # availability on this machine: (ok, why not)
    limits: Sequence[Limit] = ()  # each: (call) -> None if it fits, else why not
    description: str = ""
    _loaded: Mapping[str, Callable] | None = field(default=None, repr=False)
    _error: str | None = field(default=None, repr=False)

    def available(self) -> tuple[bool, str]:
        """Whether it can run here, and if not why (without compiling anything)."""
        if self._error is not None:
            return False, self._error
        return self.check()

    def load(self) -> Mapping[str, Callable]:
        """The callables, compiled or imported on first use; raises KernelUnavailableError."""
        if self._loaded is None:
            if self._error is not None:
                raise KernelUnavailableError(self._error)
            try:
                self._loaded = dict(self.loader())
            except Exception as exc:  # a build failure must not take the op down under auto
                self._error = f"{self.op}:{self.name} failed to load: {exc}"
                raise KernelUnavailableError(self._error) from exc
        return self._loaded

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def refuses(self, call: KernelCall) -> str | None:
        """Why this implementation does not take ``call`` (None if it does)."""
        if call.device not in self.devices:
            return f"runs on {'/'.join(self.devices) or 'no device'}, not {call.device}"
        if call.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"does not support dtype {str(call.dtype).replace('torch.', '')} (supports {names})"
        return refusal(self.limits, call)


def _registry():
    return default_registry()


def implementations(op: str, registry=None) -> list[KernelImpl]:
    """The registered implementations of ``op``, highest priority first."""
    registry = registry or _registry()
    impls = [k for k in registry.all("kernel").values() if k.op == op]
    return sorted(impls, key=lambda k: -k.priority)


def requested_impl(op: str, impl: str | None) -> str:
    """The implementation name a call asks for: the argument, else the environment, else auto."""
    if impl is not None and impl != AUTO:
        return impl
    return (
        os.environ.get(f"PEFTMED_KERNEL_IMPL_{op.upper()}")
        or os.environ.get("PEFTMED_KERNEL_IMPL")
        or AUTO
    ).strip().lower()


_cache: dict[tuple, tuple[KernelImpl, Mapping[str, Callable]]] = {}
_logged: set[tuple] = set()


def clear_cache() -> None:
    """Forget every dispatch decision (after registering kernels or changing the environment)."""
    _cache.clear()
    _logged.clear()


def resolve(op: str, impl: str | None, device: torch.device | str, dtype: torch.dtype,
            size: int | None = None, registry=None) -> tuple[KernelImpl, Mapping[str, Callable]]:
    """Pick the implementation of ``op`` for this call; returns it and its loaded callables.

    ``registry`` is the one the model was built with (``peftmed.apply(..., registry=reg)`` hands it to
    every adapter layer); None means the process-wide default registry.
    """
    wanted = requested_impl(op, impl)
    device_type = device.type if isinstance(device, torch.device) else str(device)
    registry = registry or _registry()
    key = (id(registry), op, wanted, device_type, dtype, size)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    impls = implementations(op, registry)
    if not impls:
        raise UnknownNameError("kernel op", op, sorted({k.op for k in registry.all("kernel").values()}))
    if wanted == AUTO:
        found = _auto(op, impls, device_type, dtype, size)
    else:
        found = _explicit(op, wanted, impls, device_type, dtype, size)
    _cache[key] = found
    return found


_by_key: dict[str, tuple[KernelImpl, Mapping[str, Callable]]] = {}


def dispatch(op: str, impl: str | None, device: torch.device | str, dtype: torch.dtype, size: int | None = None,
             registry=None) -> tuple[str, KernelImpl, Mapping[str, Callable]]:
    """:func:`resolve`, plus a string key naming the decision: what an op passes to its ``torch.library`` custom
    ops under ``torch.compile`` (which take no Python objects), so a compiled call runs the implementation the
    model's registry chose, exactly as an eager call does (one dispatch path for both)."""
    kernel, fns = resolve(op, impl, device, dtype, size, registry)
    key = f"{op}/{kernel.name}/{id(kernel):x}"  # the KernelImpl of this registry (kept alive below: ids stay unique)
    _by_key.setdefault(key, (kernel, fns))
    return key, kernel, fns


def dispatch_key(op: str, impl: str | None, device_type: str, dtype: torch.dtype, size: int | None = None,
                 registry=None) -> str:
    """:func:`dispatch`'s key alone, as a constant of a compiled graph: ``torch.compile`` calls it once while
    tracing (the decision is the model registry's, as in eager mode) and keeps the string."""
    return dispatch(op, impl, device_type, dtype, size, registry)[0]


# What torch.compiler.assume_constant_result does, without importing torch._dynamo when peftmed is imported (2.6 s
# on a 2-core CPU); tests/kernels/test_registry_travels.py compiles a model and fails if dynamo stops honouring it
dispatch_key._dynamo_marked_constant = True


def resolved(key: str) -> Mapping[str, Callable]:
    """The callables a :func:`dispatch` key names (inside a compiled graph's custom op)."""
    try:
        return _by_key[key][1]
    except KeyError:
        raise KernelUnavailableError(f"kernel dispatch key {key!r} was not resolved in this process") from None


def _explicit(op, wanted, impls, device_type, dtype, size):
    by_name = {k.name: k for k in impls}
    if wanted not in by_name:
        raise UnknownNameError(f"implementation of kernel op {op!r}", wanted, list(by_name) + [AUTO])
    kernel = by_name[wanted]
    reason = kernel.refuses(KernelCall(device_type, dtype, size, explicit=True))
    if reason is None:
        ok, why = kernel.available()
        reason = None if ok else why
    if reason is not None:
        raise KernelUnavailableError(
            f"kernel {op}:{wanted} cannot run this call ({device_type}, {str(dtype).replace('torch.', '')}"
            f"{'' if size is None else f', size {size}'}): {reason}. Use impl='auto' to fall back."
        )
    return kernel, kernel.load()


def _auto(op, impls, device_type, dtype, size):
    skipped: list[str] = []
    for kernel in impls:
        reason = kernel.refuses(KernelCall(device_type, dtype, size))
        if reason is None:
            ok, why = kernel.available()
            reason = None if ok else why
        if reason is None:
            try:
                fns = kernel.load()
            except KernelUnavailableError as exc:
                _log_once(("fail", op, kernel.name), logging.WARNING,
                          "%s: %s; falling back", op, str(exc).splitlines()[0])
                reason = "failed to load"
            else:
                if skipped:
                    _log_once(("auto", op, device_type, dtype, size), logging.INFO,
                              "%s on %s/%s: using %s (%s)", op, device_type, dtype, kernel.name, "; ".join(skipped))
                return kernel, fns
        skipped.append(f"{kernel.name}: {reason}")
    raise KernelUnavailableError(f"no implementation of {op} can run on {device_type}/{dtype}: {'; '.join(skipped)}")


def _log_once(key: tuple, level: int, msg: str, *args: Any) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, msg, *args)
