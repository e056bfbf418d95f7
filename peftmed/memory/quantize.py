"""A 4-bit frozen base (QLoRA): ``--quantize nf4``.

The frozen ``nn.Linear`` layers of the chosen components (default: the LLM) become bitsandbytes
``Linear4bit`` layers holding NF4 weights with double-quantized statistics (blocks of 64 values, about
0.52 bytes per weight). Everything else stays as it was: the vision tower, the projector, norms,
embeddings and the LM head (unless their component is named), and every trainable tensor. LoRA trains on
top of the 4-bit layers through their own forward (no fused kernel reads packed weights); the adapter it
saves is the same file as on a bf16 base and loads onto one. Merging into a 4-bit layer is refused.

Quantization happens after the recipe is applied, so it sees which weights train: a component trained
in full (its weights are trainable) cannot be quantized, and saying so is an error.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ..errors import ConfigError
from .checkpointing import parse_components

QUANT_TYPES = ("nf4",)


@contextlib.contextmanager
def quiet_bitsandbytes_import():
    """bitsandbytes logs a warning when it is imported on CPUs with AVX512-BF16 ("Failed to load CPU
    gemm_4bit_forward", an optional kernel it would fetch from a hub); peftmed never fetches anything, so the
    line is noise. peft imports bitsandbytes whenever it is installed: every import of either goes through here."""
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(level)


def bitsandbytes_module():
    """bitsandbytes, imported only when 4-bit quantization is asked for (its import is slow and logs on CPUs)."""
    with quiet_bitsandbytes_import():
        try:
            import bitsandbytes
        except ImportError as exc:
            raise ConfigError("--quantize nf4 needs bitsandbytes, which is not installed here "
                              "(pip install 'bitsandbytes>=0.45'; peftmed pins 0.50.2)") from exc
    return bitsandbytes


def default_components(backbone) -> tuple[str, ...]:
    if "llm" in backbone.components:
        return ("llm",)
    raise ConfigError(f"--quantize nf4 quantizes the language model by default, and backbone {backbone.name!r} has "
                      f"no 'llm' component; name the components to quantize with --quantize-components "
                      f"(one or more of {', '.join(backbone.components)})")


def quantizable_linears(peft_model, components=None) -> tuple[tuple[str, ...], list[list[tuple[str, nn.Module]]]]:
    """The components ``--quantize`` applies to, and per component the (name, nn.Linear) it quantizes: the
    frozen linear layers, heads excepted. A component training linear weights, or without any frozen
    linear layer, is an error naming it."""
    backbone, model = peft_model.backbone, peft_model.base_model
    comps = (parse_components(components, list(backbone.components), "--quantize-components") if components
             else default_components(backbone))
    heads = set()
    for comp in comps:
        if "head" in backbone.declared_roles(comp):
            heads |= set(backbone.match(model, comp, "head"))
    out = []
    for comp in comps:
        found, trained = [], []
        for prefix, root in backbone.component_roots(model, comp):
            for rel, module in root.named_modules():
                name = f"{prefix}.{rel}" if rel else prefix
                if type(module) is not nn.Linear or name in heads or name.removesuffix(".base_layer") in heads:
                    continue
                (trained if module.weight.requires_grad else found).append((name, module))
        if trained:
            raise ConfigError(f"--quantize nf4: component {comp!r} trains the weights of {len(trained)} linear "
                              f"layer(s) (e.g. {trained[0][0]}); 4-bit weights cannot be trained. Quantize only "
                              f"components whose linear weights stay frozen (LoRA, IA3, LayerNorm, BitFit...)")
        if not found:
            raise ConfigError(f"--quantize nf4: component {comp!r} of backbone {backbone.name!r} has no frozen "
                              f"linear layers to quantize")
        out.append(found)
    return comps, out


# bytes per weight of NF4 with double-quantized statistics: 4 bits, an 8-bit absmax per 64 weights, and an
# fp32 absmax (+ offset) per 256 of those
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)


def quantize_nf4(peft_model, components=None, compute_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Replace the frozen linear layers of ``components`` with NF4 ``Linear4bit`` layers, in place.

    ``compute_dtype``: what the 4-bit matmul computes in (default: fp32 on a CPU, bf16 on a GPU; a run with
    --base-dtype uses that). Returns ``{"layers": n, "weights": values quantized}``.
    """
    bnb = bitsandbytes_module()
    model = peft_model.base_model
    layers = weights = 0
    comps, found_all = quantizable_linears(peft_model, components)
    for found in found_all:
        for name, lin in found:
            device = lin.weight.device
            dtype = compute_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=dtype, compress_statistics=True, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data.to(device), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, module=q)
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.data, requires_grad=lin.bias.requires_grad)
            # bitsandbytes repacks weights for its CPU inference kernel on the first no-grad forward, and that
            # kernel has no backward: a later training step would then pass no gradient through the layer
            q.support_avx512bf16_for_cpu = False
            q.train(lin.training)
            q = q.to(device)  # quantizes (on the GPU when the weights are there)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, q)
            layers += 1
            weights += lin.in_features * lin.out_features
    peft_model.peftmed_quantized = {"type": "nf4", "components": list(comps)}
    return {"layers": layers, "weights": weights}
