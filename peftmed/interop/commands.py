"""``peftmed export --to peft``, ``peftmed import --from peft`` and ``peftmed convert llava-med SRC DST``."""

from __future__ import annotations

from ..cli import Command
from ..errors import ConfigError
from ..hookspecs import hookimpl
from .peft_format import export_to_peft, import_from_peft


def _export_configure(p):
    p.add_argument("--to", required=True, choices=["peft"], help="target format")
    p.add_argument("adapter", help="peftmed adapter folder (adapter.json + adapter.safetensors)")
    p.add_argument("out", help="folder to write (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a peft adapter already in OUT (its two files; nothing else is touched)")


def _export_run(args) -> int:
    print(f"wrote {export_to_peft(args.adapter, args.out, overwrite=args.overwrite)} (peft format)")
    return 0


def _import_configure(p):
    p.add_argument("--from", dest="source", required=True, choices=["peft"], help="source format")
    p.add_argument("src", help="peft adapter folder")
    p.add_argument("out", help="peftmed adapter folder to write")
    p.add_argument("--backbone", "-b", required=True, help="the peftmed backbone of the model (e.g. hf-blip-vqa)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a peftmed adapter already in OUT (adapter.json + adapter.safetensors; nothing else)")


def _import_run(args) -> int:
    print(f"wrote {import_from_peft(args.src, args.out, backbone=args.backbone, overwrite=args.overwrite)} "
          f"(peftmed adapter)")
    return 0


def _convert_configure(p):
    p.description = (
        "Convert a checkpoint released in another code base's format into a folder a peftmed backbone loads\n"
        "with --pretrained. llava-med (alias llava): the original LLaVA / LLaVA-Med format\n"
        "(LlavaMistralForCausalLM / LlavaLlamaForCausalLM keys: model.mm_projector.*, model.vision_tower.vision_tower.*)\n"
        "-> transformers' LlavaForConditionalGeneration layout for 'hf-llava' / 'llava-med-7b'. Safetensors in,\n"
        "safetensors out, streamed tensor by tensor; nothing is unpickled.\n\n"
        "example:\n"
        "  peftmed convert llava-med checkpoints/llava-med-v1.5-mistral-7b models/llava-med-7b\n"
        "  peftmed train --backbone llava-med-7b --pretrained models/llava-med-7b --base-dtype bf16 ...")
    p.add_argument("format", choices=["llava-med", "llava"], help="the source checkpoint's format")
    p.add_argument("src", help="the source checkpoint folder (config.json, *.safetensors, tokenizer files)")
    p.add_argument("dst", help="the folder to write (config.json, model*.safetensors, tokenizer, preprocessor config)")
    p.add_argument("--vision-tower", metavar="FOLDER",
                   help="a CLIP vision checkpoint (safetensors + config.json), for a source without its vision tower")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast the weights (default: keep the source's)")
    p.add_argument("--shard-size", type=float, default=2.0, metavar="GB",
                   help="largest output shard in GB [default: 2]")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty DST (the converter's own file names are replaced, nothing else)")


def _convert_run(args) -> int:
    import math

    import torch

    from ..backbones.hf.convert import CONVERTERS  # deferred: imports tokenizers and transformers' models

    if not (args.shard_size > 0 and math.isfinite(args.shard_size)):
        raise ConfigError(f"--shard-size must be a positive number of GB, got {args.shard_size}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(args.dtype)
    summary = CONVERTERS[args.format](args.src, args.dst, vision_tower=args.vision_tower, dtype=dtype,
                                      shard_size=int(args.shard_size * 1024**3), overwrite=args.overwrite)
    print(f"wrote {args.dst}: {len(summary['shards'])} shard(s), {summary['bytes'] / 1024**3:.2f} GB, "
          f"{summary['text']} LLM, {summary['projector']} projector, vocabulary {summary['original_vocab']} -> "
          f"{summary['vocab']} (<image> = {summary['image_token_id']})")
    print(f"load it with: --backbone hf-llava --pretrained {args.dst}")
    return 0


@hookimpl
def register_commands(register):
    register(Command("export", "write an adapter in another library's format ('--to peft')", _export_configure, _export_run))
    register(Command("import", "read an adapter written by another library ('--from peft')", _import_configure, _import_run))
    register(Command("convert", "convert a released checkpoint into a loadable folder ('llava-med SRC DST')",
                     _convert_configure, _convert_run))
