"""Helpers of the kernel tests: comparing with the oracle (the tolerance table is peftmed.testing's
ORACLE_TOLERANCES, (rtol, atol) like every table there) and what can run here."""

from __future__ import annotations

import os

import torch

from peftmed.testing.helpers import ORACLE_TOLERANCES as TOLERANCES  # (rtol, atol) per dtype


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Compare in fp32 with the dtype's tolerance, atol scaled by the reference's largest value."""
    rtol, atol = TOLERANCES[dtype]
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
