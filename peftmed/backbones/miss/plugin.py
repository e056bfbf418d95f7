"""Registers the MISS backbones: ``miss`` (any size, by options), ``miss-base`` and ``miss-tiny``."""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import UnknownNameError
from ...hookspecs import hookimpl
from ..base import Backbone
from .checkpoint import from_pretrained
from .config import PRESETS, MissConfig
from .model import MissForVQA
from .tokenizer import MissTokenizer

TINY_VOCAB = 1000  # target size of the WordPiece vocabulary trained for presets with vocab_size=None


def build_miss(size: str = "base", *, tokenizer: MissTokenizer | None = None, vocab_file: str | Path | None = None,
               texts=None, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               **overrides) -> MissForVQA:
    """A freshly initialised MISS model.

    size: a preset (``base``, ``tiny``); ``overrides`` change any :class:`MissConfig` field.
    Tokenizer: ``tokenizer`` as given, else a BERT ``vocab_file``, else WordPiece trained on ``texts``
    (the dataset's questions and answers; default: a small built-in corpus).
    ``device="meta"`` builds without allocating memory (parameter counts).
    """
    if size not in PRESETS:
        raise UnknownNameError("miss size", size, PRESETS)
    fields = {**PRESETS[size], **overrides}
    if tokenizer is None:
        if vocab_file is not None:
            tokenizer = MissTokenizer.from_vocab_file(vocab_file)
        else:
            target = fields.get("vocab_size", MissConfig.vocab_size) or TINY_VOCAB
            tokenizer = MissTokenizer.train(texts, vocab_size=target)
    if "vocab_size" in fields and fields["vocab_size"] is None:
        fields["vocab_size"] = len(tokenizer)
    config = MissConfig.from_dict(fields)
    if device is None:  # build where the caller's context says (e.g. `with torch.device("meta")`)
        model = MissForVQA(config, tokenizer)
    else:
        with torch.device(device):
            model = MissForVQA(config, tokenizer)
    return model.to(dtype) if dtype is not None else model


def load_miss(path, **options) -> MissForVQA:
    options.pop("size", None)  # the folder's config.json decides the size
    return from_pretrained(path, **options)


# Module names relative to a component root (visual_encoder | text_encoder | text_decoder).
MISS_ROLES = {
    "attn.q": (r"\.attn\.q$", r"\.attention\.self\.query$"),
    "attn.k": (r"\.attn\.k$", r"\.attention\.self\.key$"),
    "attn.v": (r"\.attn\.v$", r"\.attention\.self\.value$"),
    "attn.o": (r"\.attn\.proj$", r"\.attention\.output\.dense$"),
    "cross.q": r"crossattention\.self\.query$",
    "cross.k": r"crossattention\.self\.key$",
    "cross.v": r"crossattention\.self\.value$",
    "cross.o": r"crossattention\.output\.dense$",
    "mlp.up": (r"\.mlp\.fc1$", r"\.intermediate\.dense$"),
    "mlp.down": (r"\.mlp\.fc2$", r"layer\.\d+\.output\.dense$"),
    "embed": (r"^patch_embed\.proj$", r"embeddings\.(word|position)_embeddings$"),
    "patch": r"^patch_embed\.proj$",
    "head": r"^cls\.predictions\.(transform\.dense|decoder)$",
    "self_attention": (r"\.attn$", r"(^|\.)attention\.self$"),
    "cross_attention": r"crossattention\.self$",
}
MISS_COMPONENTS = {"vision": "visual_encoder", "fusion": "text_encoder", "decoder": "text_decoder"}


# miss-tiny's 64 text positions would clip a report (phantom reports run to ~95 word pieces)
TASK_OPTIONS = {"tiny": {"report": {"max_position_embeddings": 128}}}


def _backbone(name: str, size: str, description: str) -> Backbone:
    return Backbone(name=name, components=MISS_COMPONENTS, roles=MISS_ROLES, builder=build_miss, loader=load_miss,
                    tokenizer_loader=MissTokenizer.load, description=description, tasks=("vqa", "report"),
                    task_options=TASK_OPTIONS.get(size, {}), defaults={"size": size},
                    depth_options={"vision_layers": ("vision",), "text_layers": ("fusion", "decoder")})


MISS_BACKBONES = (
    _backbone("miss", "base", "MISS generative Med-VQA (ViT | JTM | decoder); size=base|tiny and config options"),
    _backbone("miss-base", "base", "MISS: ViT-B/16 @480px + BERT-base JTM + BERT-base decoder (361,478,972 params)"),
    _backbone("miss-tiny", "tiny", "MISS graph at toy size (64 px, width 64, 2 layers) for CPU tests"),
)


@hookimpl
def register_backbones(register):
    for backbone in MISS_BACKBONES:
        register(backbone)
