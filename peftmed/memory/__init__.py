"""Memory features for real sizes: a low-precision frozen base (``precision``), gradient checkpointing
per component (``checkpointing``), a 4-bit base (``quantize``) and the "will it fit?" estimate (``plan``).

They are applied in this order after a recipe: quantize the base (LoRA then runs on top of the 4-bit
layers), cast what stays frozen to the base dtype, turn on checkpointing. ``prepare`` does all three.
"""

from __future__ import annotations

from .checkpointing import enable_checkpointing, parse_components
from .precision import BASE_DTYPES, autocast_for, base_dtype_of, parse_base_dtype, set_base_dtype
from .quantize import quantize_nf4

__all__ = [
    "BASE_DTYPES", "autocast_for", "base_dtype_of", "enable_checkpointing", "parse_base_dtype",
    "parse_components", "prepare", "quantize_nf4", "set_base_dtype",
]


def prepare(peft_model, *, base_dtype=None, grad_checkpoint=None, quantize=None, quantize_components=None):
    """Quantize, cast and checkpoint a PeftModel as a run's options ask (each step optional).

    Returns a dict of what was done (for the run's log and results)."""
    done: dict = {}
    if quantize:
        done["quantized"] = quantize_nf4(peft_model, components=quantize_components)
    if base_dtype is not None:
        done["base_dtype"] = set_base_dtype(peft_model, base_dtype)
    if grad_checkpoint:
        done["grad_checkpoint"] = enable_checkpointing(peft_model, grad_checkpoint)
    return done
