"""Generic transformers encoders: ViT-style (images), BERT-style (text) and CLIP-style (both).

A backbone's components are fixed when it is registered, so each kind has its own name:

- ``hf-encoder``: a CLIP-style dual encoder (``CLIPModel``): components ``vision`` and ``text``.
- ``hf-encoder-vision``: a ViT-style image encoder (``ViTModel``, ``CLIPVisionModel``...): ``vision``.
- ``hf-encoder-text``: a BERT-style text encoder (``BertModel``, ``RobertaModel``...): ``text``.

They are feature extractors (no VQA head): ``encode_images(uint8 images)`` and ``encode_texts(list of
str)`` return the last hidden states. One role map covers the BERT/ViT and CLIP module names.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ...errors import ConfigError, PeftmedError
from ..base import Backbone
from ..images import IMAGENET_MEAN, IMAGENET_STD, prepare_images
from .common import (
    CLIP_MEAN,
    CLIP_STD,
    load_tokenizer,
    load_weights,
    local_folder,
    read_image_stats,
    saved_tokenizer,
    seeded_model,
    write_image_stats,
)
from .prefix import make_prefix_capable
from .tokenizer import CORPUS, check_vocab, wordpiece_tokenizer

_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
               patch_size=8)
_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)

# kind -> (config class, model class, tiny config options) of the default preset of each backbone
ARCHS = {
    "clip": ("CLIPConfig", "CLIPModel"),
    "vit": ("ViTConfig", "ViTModel"),
    "bert": ("BertConfig", "BertModel"),
}
KIND_OF = {"hf-encoder": "clip", "hf-encoder-vision": "vit", "hf-encoder-text": "bert"}
# model_type families a loaded folder must belong to, per backbone
FAMILIES = {
    "hf-encoder": ("clip", "siglip", "chinese_clip"),
    "hf-encoder-vision": ("vit", "clip_vision_model", "deit", "beit", "dinov2", "siglip_vision_model"),
    "hf-encoder-text": ("bert", "roberta", "distilbert", "electra", "clip_text_model"),
}


class HFEncoder(nn.Module):
    """A transformers encoder (at ``.model``) with image statistics and a tokenizer where it reads text."""

    def __init__(self, model: nn.Module, kind: str, tokenizer=None, image_size: int | None = None,
                 image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD):
        super().__init__()
        self.model, self.kind, self.tokenizer = model, kind, tokenizer
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        vision_cfg = getattr(model.config, "vision_config", model.config)
        self.image_size = int(image_size or getattr(vision_cfg, "image_size", 0)) or None
        if tokenizer is not None:
            text_cfg = getattr(model.config, "text_config", model.config)
            check_vocab(tokenizer, text_cfg.vocab_size, f"hf-encoder ({kind})")

    @property
    def reads_images(self) -> bool:
        return self.kind in ("clip", "vit")

    @property
    def reads_text(self) -> bool:
        return self.kind in ("clip", "bert")

    def _tower(self, which: str) -> nn.Module:
        if self.kind == "clip":
            return self.model.vision_model if which == "vision" else self.model.text_model
        return self.model

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) -> last hidden states (B, N, D) of the image encoder."""
        if not self.reads_images:
            raise PeftmedError(f"this {self.kind} encoder reads text only; use encode_texts")
        dtype = next(self.parameters()).dtype
        pixels = prepare_images(images, self.image_size, self.image_mean, self.image_std, dtype)
        return self._tower("vision")(pixel_values=pixels.to(next(self.parameters()).device))[0]

    def encode_texts(self, texts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> (last hidden states (B, T, D), attention mask (B, T))."""
        if not self.reads_text:
            raise PeftmedError(f"this {self.kind} encoder reads images only; use encode_images")
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        device = next(self.parameters()).device
        mask = enc["attention_mask"].to(device)
        return self._tower("text")(input_ids=enc["input_ids"].to(device), attention_mask=mask)[0], mask

    def example_inputs(self, batch: int = 2, seq: int | None = None, generator: torch.Generator | None = None):
        """Keyword inputs for one forward pass: random uint8 images and corpus questions (for the test kit)."""
        g = generator or torch.Generator().manual_seed(0)
        out = {}
        if self.reads_images:
            s = self.image_size
            out["images"] = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, generator=g)
        if self.reads_text:
            picks = torch.randint(0, len(CORPUS), (batch,), generator=g).tolist()
            out["texts"] = [CORPUS[i].split("?")[0] + "?" for i in picks]
        return out

    def forward(self, images: torch.Tensor | None = None, texts: list[str] | None = None) -> dict[str, torch.Tensor]:
        out = {}
        if images is not None:
            out["vision"] = self.encode_images(images)
        if texts is not None:
            out["text"], out["text_mask"] = self.encode_texts(texts)
        if not out:
            raise ConfigError("pass images=, texts= or both")
        return out

    def save_pretrained(self, path: str | os.PathLike):
        from pathlib import Path

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(folder))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(folder))
        if self.image_size:
            write_image_stats(folder, self.image_size, self.image_mean, self.image_std, "ViTImageProcessor")
        return folder


def _tiny_config(kind: str, vocab_size: int, pad_token_id: int):
    import transformers

    config_class = getattr(transformers, ARCHS[kind][0])
    text = dict(_TEXT, vocab_size=vocab_size, pad_token_id=pad_token_id)
    if kind == "clip":
        return config_class(vision_config=dict(_VISION), text_config=dict(text, eos_token_id=3, bos_token_id=2),
                            projection_dim=32)
    return config_class(**(_VISION if kind == "vit" else text))


def _builder(name: str):
    kind = KIND_OF[name]

    def build(config=None, tokenizer=None, texts=None, image_size: int | None = None, seed: int | None = 0):
        """A fresh tiny encoder (or one from ``config``); text encoders get a trained WordPiece tokenizer."""
        import transformers

        if kind != "vit" and tokenizer is None:
            tokenizer = wordpiece_tokenizer(texts, vocab_size=400)
        if config is None:
            config = _tiny_config(kind, len(tokenizer) if tokenizer is not None else 0,
                                  tokenizer.pad_token_id if tokenizer is not None else 0)
            if image_size is not None:
                getattr(config, "vision_config", config).image_size = int(image_size)
        model = seeded_model(getattr(transformers, ARCHS[kind][1]), config, seed)
        mean, std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
        return HFEncoder(model, kind, tokenizer, image_mean=mean, image_std=std)

    return build


def _loader(name: str):
    kind = KIND_OF[name]

    def load(path: str | os.PathLike, strict: bool = True) -> HFEncoder:
        """Load a local folder with ``AutoModel``; a folder of another family is refused, naming the right backbone."""
        from transformers import AutoConfig, AutoModel

        folder = local_folder(path, name)
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if config.model_type not in FAMILIES[name]:
            fits = [n for n, fam in FAMILIES.items() if config.model_type in fam]
            raise PeftmedError(f"{name}: {str(folder)!r} holds a {config.model_type!r} model, expected one of "
                               f"{FAMILIES[name]}" + (f"; load it with backbone {fits[0]!r}" if fits else ""))
        model = load_weights(AutoModel, folder, name, strict)
        tokenizer = load_tokenizer(folder, name) if kind != "vit" else None
        default_mean = (CLIP_MEAN, CLIP_STD) if kind == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
        vision_cfg = getattr(model.config, "vision_config", model.config)
        size, mean, std = read_image_stats(folder, getattr(vision_cfg, "image_size", 0), *default_mean)
        return HFEncoder(model, kind, tokenizer, image_size=size or None, image_mean=mean, image_std=std)

    return load


# Module names differ across families and transformers versions (ViT's attention.attention.query became
# attention.q_proj in transformers 5.2x); each pattern accepts every spelling.
_ATTN = r"(self_attn|attention|attention\.self|attention\.attention)"
ROLES = {
    "attn.q": _ATTN + r"\.(q_proj|query)$",
    "attn.k": _ATTN + r"\.(k_proj|key)$",
    "attn.v": _ATTN + r"\.(v_proj|value)$",
    "attn.o": r"((self_attn|attention)\.(out_proj|o_proj)|attention\.output\.dense)$",
    "mlp.up": r"(mlp\.fc1|intermediate\.dense)$",
    "mlp.down": r"(mlp\.fc2|layers?\.\d+\.output\.dense)$",
    "embed": r"(^|\.)embeddings$",
    "self_attention": r"(self_attn|attention\.(self|attention)|layers\.\d+\.attention)$",
}

COMPONENTS = {
    "hf-encoder": {"vision": "model.vision_model", "text": "model.text_model"},
    "hf-encoder-vision": {"vision": "model"},
    "hf-encoder-text": {"text": "model"},
}
DESCRIPTIONS = {
    "hf-encoder": "transformers CLIP-style dual encoder (vision | text), feature extractor",
    "hf-encoder-vision": "transformers ViT-style image encoder (vision), feature extractor",
    "hf-encoder-text": "transformers BERT-style text encoder (text), feature extractor",
}

BACKBONES = tuple(
    Backbone(name=name, components=COMPONENTS[name], roles=ROLES, builder=_builder(name), loader=_loader(name),
             prefix_wrapper=make_prefix_capable, tokenizer_loader=saved_tokenizer, description=DESCRIPTIONS[name], tiny=name == "hf-encoder")  # the kit runs on the dual encoder
    for name in KIND_OF
)
