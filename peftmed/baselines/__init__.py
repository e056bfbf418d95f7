"""Baseline providers: the same recipe run through another library on the same model.

``peftmed.baselines.hf_peft`` runs a recipe through huggingface/peft (an optional dependency:
``pip install peftmed[baseline]``) so ``peftmed bench`` can show peftmed/peft ratios.
"""

from .hf_peft import PeftUnavailable, apply_peft, parameter_methods, peft_equivalent, peft_version

__all__ = ["PeftUnavailable", "apply_peft", "parameter_methods", "peft_equivalent", "peft_version"]
