"""Memory features for real sizes: a low-precision frozen base (``precision``), gradient checkpointing
per component (``checkpointing``), a 4-bit base (``quantize``) and the "will it fit?" estimate (``plan``).

They are applied in this order after a recipe: quantize the base (LoRA then runs on top of the 4-bit
layers), cast what stays frozen to the base dtype, turn on checkpointing. ``prepare`` does all three.
"""

from __future__ import annotations

from ..errors import ConfigError
from .checkpointing import enable_checkpointing, parse_components
from .precision import BASE_DTYPES, autocast_for, base_dtype_of, parse_base_dtype, resolve_base_dtype, set_base_dtype
from .quantize import quantize_nf4

__all__ = [
    "BASE_DTYPES", "autocast_for", "prepare_from_config", "base_dtype_of", "enable_checkpointing", "parse_base_dtype",
    "parse_components", "prepare", "quantize_nf4", "resolve_base_dtype", "set_base_dtype",
]


def prepare(peft_model, *, base_dtype="auto", grad_checkpoint=None, quantize=None, quantize_components=None,
            device=None) -> dict:
    """Quantize, cast and checkpoint a PeftModel as a run's options ask (each step optional), in place.

    ``base_dtype``: ``auto`` (the model's own: a bf16 checkpoint stays bf16), ``fp32``, ``bf16``, ``fp16``;
    trainable tensors become fp32 whenever the base is not. ``quantize``: ``nf4`` or None/``none``.
    ``device``: where to quantize (a GPU quantizes in a moment; the model is moved there first).
    Returns what was done (for the run's log)."""
    done: dict = {}
    dtype = resolve_base_dtype(base_dtype, peft_model)
    if quantize not in (None, "none"):
        if quantize != "nf4":
            raise ConfigError(f"--quantize must be nf4 or none, got {quantize!r}")
        if device is not None:
            peft_model.to(device)
        done["quantized"] = quantize_nf4(peft_model, components=quantize_components, compute_dtype=dtype)
    if dtype is not None:
        done["base_dtype"] = set_base_dtype(peft_model, dtype)
    if grad_checkpoint:
        done["grad_checkpoint"] = enable_checkpointing(peft_model, grad_checkpoint)
    return done


def prepare_from_config(peft_model, config, device=None) -> dict:
    """:func:`prepare` with a TrainConfig's memory options."""
    return prepare(peft_model, base_dtype=config.base_dtype, grad_checkpoint=config.grad_checkpoint,
                   quantize=config.quantize, quantize_components=config.quantize_components, device=device)
