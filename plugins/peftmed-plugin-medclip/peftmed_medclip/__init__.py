"""A CLIP-style medical dual encoder with a classification head (the shape of MedCLIP and
BiomedCLIP), as a peftmed backbone plugin: the model, its components, its role map and presets.

    image -> vision (ViT) -> projection.visual --\\
                                                 cosine x logit_scale -> logits (B, classes)
    class prompts -> text (BERT-like) -> projection.text --/

Classification is zero-shot style, as MedCLIP's prompt classifier: the logits are the scaled cosine
similarities between the image embedding and one text embedding per class (its prompt). Without
prompts the linear probe ``classifier`` gives the logits instead.

Components: ``vision``, ``text``, ``projector`` (both projections), ``head`` (the linear probe).
Attention modules follow peftmed's prefix protocol, so prompt-family methods work on both towers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import peftmed
from peftmed.attention import attend

__version__ = "0.1.0"


class Attention(nn.Module):
    """Multi-head self-attention with CLIP's module names; takes key/value prefixes (peftmed protocol)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.prefix_provider = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        prefix = self.prefix_provider() if self.prefix_provider is not None else None
        out = attend(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), prefix=prefix,
                     attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class Layer(nn.Module):
    """Pre-norm transformer layer (CLIP's ViT and BiomedCLIP's text tower share this shape)."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.layer_norm1, self.self_attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.layer_norm2 = nn.LayerNorm(dim)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, mlp), "fc2": nn.Linear(mlp, dim)})

    def forward(self, x, attn_mask=None):
        x = x + self.self_attn(self.layer_norm1(x), attn_mask)
        return x + self.mlp["fc2"](F.gelu(self.mlp["fc1"](self.layer_norm2(x))))


class Encoder(nn.Module):
    """Embeddings + layers + final norm; pools the first token ([CLS])."""

    def __init__(self, dim: int, heads: int, layers: int, mlp: int, tokens: int, *, patch: int = 0, vocab: int = 0):
        super().__init__()
        # images: linear patch embedding of unfolded patches; text: token embedding
        self.embed = nn.Linear(3 * patch * patch, dim) if patch else nn.Embedding(vocab, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if patch else None
        self.position = nn.Embedding(tokens, dim)
        self.layers = nn.ModuleList(Layer(dim, heads, mlp) for _ in range(layers))
        self.post_layernorm = nn.LayerNorm(dim)
        self.patch = patch

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.patch:
            patches = F.unfold(x, kernel_size=self.patch, stride=self.patch).transpose(1, 2)  # (B, N, 3*p*p)
            h = self.embed(patches)
            h = torch.cat([self.cls.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)  # (B, 1+N, C)
        else:
            h = self.embed(x)  # (B, T, C)
        h = h + self.position.weight[: h.shape[1]].to(h.dtype)
        for layer in self.layers:
            h = layer(h, attention_mask)
        return self.post_layernorm(h[:, 0])  # (B, C)


class MedClipModel(nn.Module):
    def __init__(self, image_size: int = 32, patch: int = 8, vision_dim: int = 32, vision_layers: int = 2,
                 text_dim: int = 32, text_layers: int = 2, heads: int = 4, vocab: int = 128, max_text: int = 16,
                 embed_dim: int = 16, num_classes: int = 3):
        super().__init__()
        n_patches = (image_size // patch) ** 2
        self.vision_model = Encoder(vision_dim, heads, vision_layers, 4 * vision_dim, n_patches + 1, patch=patch)
        self.text_model = Encoder(text_dim, heads, text_layers, 4 * text_dim, max_text, vocab=vocab)
        self.projection = nn.ModuleDict({
            "visual": nn.Linear(vision_dim, embed_dim, bias=False),
            "text": nn.Linear(text_dim, embed_dim, bias=False),
        })
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self.classifier = nn.ModuleDict({"out": nn.Linear(embed_dim, num_classes)})
        self.image_size, self.vocab, self.max_text, self.num_classes = image_size, vocab, max_text, num_classes

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection["visual"](self.vision_model(pixel_values)), dim=-1)  # (B, E)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.projection["text"](self.text_model(input_ids, attention_mask)), dim=-1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``input_ids``: one prompt per class, (classes, T). Returns logits (B, classes)."""
        image = self.encode_image(pixel_values)
        if input_ids is None:
            return {"logits": self.classifier["out"](image), "image_embeds": image}
        text = self.encode_text(input_ids, attention_mask)
        logits = self.logit_scale.exp() * image @ text.t()  # (B, classes)
        return {"logits": logits, "image_embeds": image, "text_embeds": text}

    def example_inputs(self, batch: int = 2, seq: int = 6, generator: torch.Generator | None = None):
        g = generator or torch.Generator().manual_seed(0)
        return {
            "pixel_values": torch.randn(batch, 3, self.image_size, self.image_size, generator=g),
            "input_ids": torch.randint(0, self.vocab, (self.num_classes, min(seq, self.max_text)), generator=g),
        }


MEDCLIP_ROLES = {
    "attn.q": r"\.self_attn\.q_proj$", "attn.k": r"\.self_attn\.k_proj$", "attn.v": r"\.self_attn\.v_proj$",
    "attn.o": r"\.self_attn\.out_proj$", "mlp.up": r"\.mlp\.fc1$", "mlp.down": r"\.mlp\.fc2$",
    "embed": (r"^embed$", r"^position$"), "self_attention": r"\.self_attn$",
    "head": (r"^out$", r"^visual$", r"^text$"),
}
COMPONENTS = {"vision": "vision_model", "text": "text_model", "projector": "projection", "head": "classifier"}


def _backbone(name: str, description: str, tiny: bool, **defaults) -> peftmed.Backbone:
    return peftmed.Backbone(name=name, components=COMPONENTS, roles=MEDCLIP_ROLES, builder=MedClipModel,
                            description=description, tasks=("classify",), defaults=defaults, tiny=tiny)


BACKBONES = (
    _backbone("medclip-tiny", "CLIP-style medical dual encoder + classifier, sized for CPU tests", True),
    # ViT-B/16 at 224 px and a BERT-base-sized text tower with 512-d projections (BiomedCLIP's sizes)
    _backbone("medclip-base", "CLIP-style medical dual encoder + classifier (BiomedCLIP sizes)", False,
              image_size=224, patch=16, vision_dim=768, vision_layers=12, text_dim=768, text_layers=12, heads=12,
              vocab=30522, max_text=256, embed_dim=512, num_classes=2),
)


@peftmed.hookimpl
def register_backbones(register):
    for backbone in BACKBONES:
        register(backbone)
