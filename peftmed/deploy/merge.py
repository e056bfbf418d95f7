"""``peftmed merge``: fold an adapter into its base weights and write a model that loads without peftmed.

- inject methods that can merge (LoRA, IA3, DoRA...) are folded into the weights they wrap; select
  methods (LayerNorm-, BitFit-, FFN-, Attention-tuning, full) already are the weights;
- prompt methods (Prefix, P-Tuning v2) add key/value prefixes no weight can hold: they are refused by
  name, unless ``keep_unmergeable``, which writes them as a peftmed adapter in ``OUTPUT/adapter`` beside
  the merged weights (that model then needs peftmed to load the adapter);
- the base is rebuilt unquantized (merging into 4-bit weights would round the update away); an adapter
  trained on a 4-bit base is merged into the full-precision weights, with a note.

What is written: for the transformers backbones, the model's own ``save_pretrained`` folder (config,
safetensors weights, tokenizer, preprocessor config: ``BlipForQuestionAnswering.from_pretrained(DIR)``
and ``LlavaForConditionalGeneration.from_pretrained(DIR)`` load it); for MISS its checkpoint folder
(``config.json``, ``model.safetensors`` in BLIP key format, ``vocab.txt``: ``peftmed.backbones.miss.
from_pretrained`` and BLIP-format loaders read it).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from ..errors import ConfigError, PeftmedError
from ..files import check_output_path
from ..methods.base import AdapterLayer, is_quantized
from ..model import apply, find_peft_model
from ..plugins import default_registry
from ..run.model import load_adapted

log = logging.getLogger("peftmed.merge")


def split_recipe(pm, name: str | None = None):
    """(mergeable methods, methods no weight can hold) of the active adapter, as (component, method) pairs."""
    state = pm.adapters[name or pm.active_adapter]
    kept, refused = [], []
    for applied in state.applied:
        family, method = applied.method.family, applied.method
        if family == "select" or (family == "inject" and method.mergeable):
            kept.append((applied.component, method.name))
        else:
            refused.append((applied.component, method.name))
    return kept, refused


def merged_model(pm, *, keep_unmergeable: bool = False):
    """Merge ``pm``'s active adapter in place; returns (the plain base model, the unmergeable part as a
    ``(recipe dict, tensors)`` pair or None)."""
    name = pm.active_adapter
    if name is None:
        raise PeftmedError("no active adapter to merge")
    if any(is_quantized(m) for m in pm.base_model.modules()):
        raise PeftmedError("cannot merge into a 4-bit base: its weights are quantized (NF4), and adding the update "
                           "would re-quantize it and lose it. Rebuild the base in bf16 or fp32 (peftmed merge does: "
                           "--quantize none) and merge there")
    kept, refused = split_recipe(pm, name)
    if refused and not keep_unmergeable:
        listed = ", ".join(f"{c}={m}" for c, m in refused)
        raise ConfigError(f"{listed}: these methods add prefixes or prompts, which no weight can hold, so they cannot "
                          f"be merged; pass --keep-unmergeable to write them as an adapter beside the merged weights")
    state = pm.adapters[name]
    leftover = None
    if refused:
        calls: dict[str, list] = {}
        tensors: dict[str, torch.Tensor] = {}
        for applied in state.applied:
            if (applied.component, applied.method.name) in refused:
                calls.setdefault(applied.component, []).append(
                    {"method": applied.method.name, "options": _options(applied)})
                tensors.update({k: p.detach().clone() for k, p in applied.tensors(pm, name).items()})
        leftover = (calls, tensors)
    # merge from the innermost wrapper out (LoRA under IA3: W' = diag(s) (W + s_l B A)), each into the original
    # module's weights: exact for the stacked linear updates the built-in methods make
    with torch.no_grad():
        for mod_name, module in list(pm.base_model.named_modules()):
            if not isinstance(module, AdapterLayer) or ".base_layer" in f".{mod_name}":
                continue
            chain = [module]
            while isinstance(chain[-1].base_layer, AdapterLayer):
                chain.append(chain[-1].base_layer)
            for layer in reversed(chain):
                if name in layer.configs and name not in layer.merged_adapters:
                    layer.merge_into(name, layer.innermost)
                    layer.merged_adapters.append(name)
    base = pm.unload()
    for p in base.parameters():
        p.requires_grad_(False)
    return base, leftover


def _options(applied) -> dict:
    defaults = type(applied.config)()
    return {k: v for k, v in applied.config.to_dict().items() if getattr(defaults, k, None) != v}


def save_model(model, output: Path) -> list[str]:
    """Write ``model`` as a folder that loads without peftmed; returns the files written."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one model, one shard: no bar
    from ..backbones.miss.model import MissForVQA  # deferred (as transformers above): MISS imports tokenizers

    if isinstance(model, MissForVQA):
        from ..backbones.miss.checkpoint import save_pretrained  # deferred: imports tokenizers

        saver = functools.partial(save_pretrained, model)
    else:
        saver = getattr(model, "save_pretrained", None)
    if saver is None:
        raise PeftmedError(f"{type(model).__name__} has no save_pretrained: peftmed merge writes the models of backbones "
                           f"that can save themselves (the built-in ones); save model.state_dict() yourself")
    before = set(output.iterdir()) if output.is_dir() else set()
    output.mkdir(parents=True, exist_ok=True)
    saver(output)
    return sorted(p.name for p in set(output.iterdir()) - before)


def merge_adapter(adapter, output, *, registry=None, keep_unmergeable: bool = False, base_dtype: str | None = None,
                  overwrite: bool = False) -> dict:
    """Merge the adapter folder ``adapter`` (rebuilt on its run's base) and write the model to ``output``."""
    registry = registry or default_registry()
    output = check_output_path(output, flag="--output", kind="folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"output folder {str(output)!r} is not empty; choose another or pass --overwrite (files of "
                          f"the same names are replaced, nothing else is touched)")
    _, task_model, opts, manifest = load_adapted(adapter, registry=registry, device="cpu", base_dtype=base_dtype,
                                                 quantize="none")
    if opts.get("quantize", "none") != "none":
        log.warning("the adapter was trained on a 4-bit (NF4) base; it is merged into the full-precision weights "
                    "(the update was learned against NF4-rounded ones: check the merged model's answers)")
    pm = find_peft_model(task_model)
    model, leftover = merged_model(pm, keep_unmergeable=keep_unmergeable)
    written = save_model(model, output)
    result = {"output": str(output), "files": written, "recipe": manifest["recipe"], "backbone": manifest["backbone"]}
    if leftover is not None:
        calls, tensors = leftover
        kept = apply(model, calls, backbone=registry.backbone(manifest["backbone"]), registry=registry,
                     keep_base=False)
        own = kept.adapter_tensors()
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(tensors[k])
        kept.save_adapter(output / "adapter")
        result["adapter"] = str(output / "adapter")
        result["kept"] = {c: [x["method"] for x in v] for c, v in calls.items()}
    return result
