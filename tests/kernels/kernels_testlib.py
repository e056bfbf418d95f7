"""Helpers of the kernel tests: the ONE per-dtype tolerance table and what can run here."""

from __future__ import annotations

import os

import torch

# (atol, rtol) against the fp32 oracle, relative to the magnitude of the reference output
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Compare in fp32 with the dtype's tolerance, atol scaled by the reference's largest value."""
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, expected.detach().float().abs().max().item())
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(), atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def triton_runs_here() -> tuple[bool, str]:
    if torch.cuda.is_available():
        return True, ""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False, "no CUDA and triton was imported before TRITON_INTERPRET=1 was set"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    return True, ""


def cpp_runs_here() -> tuple[bool, str]:
    from peftmed.kernels import build

    return build.can_compile(cuda=False)
