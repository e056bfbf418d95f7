"""``toy-vlm``: a small three-component torch model with conventional module names.

It is the smallest complete example of a backbone plugin written with the public API (a builder and
a role map in a few lines), and the model the core's tests run every method on. It has no task head
beyond token logits; the Med-VQA backbones (``miss-*``, ``hf-*``) are the real ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import attend
from ..hookspecs import hookimpl
from .base import Backbone


class ToyAttention(nn.Module):
    """Follows the prefix protocol of peftmed.attention (num_heads, head_dim, prefix_provider)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.prefix_provider = None

    def forward(self, x, context=None, causal=False):
        context = x if context is None else context
        b, t, d = x.shape
        split = lambda y: y.view(b, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        prefix = self.prefix_provider() if self.prefix_provider is not None else None
        out = attend(split(self.q(x)), split(self.k(context)), split(self.v(context)), prefix=prefix, causal=causal)
        return self.o(out.transpose(1, 2).reshape(b, t, d))


class ToyMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ToyBlock(nn.Module):
    def __init__(self, dim: int, heads: int, cross: bool):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), ToyAttention(dim, heads)
        self.norm_c = nn.LayerNorm(dim) if cross else None
        self.cross = ToyAttention(dim, heads) if cross else None
        self.norm2, self.mlp = nn.LayerNorm(dim), ToyMLP(dim, 4 * dim)

    def forward(self, x, context=None, causal=False):
        x = x + self.attn(self.norm1(x), causal=causal)
        if self.cross is not None:
            x = x + self.cross(self.norm_c(x), context)
        return x + self.mlp(self.norm2(x))


class ToyVLM(nn.Module):
    """vision (patch encoder) -> fusion (text encoder cross-attending to the image) -> decoder (LM)."""

    def __init__(self, dim: int = 32, heads: int = 4, layers: int = 2, vocab: int = 64, patch: int = 8,
                 image_size: int = 32):
        super().__init__()
        self.vision = nn.ModuleDict({
            "patch_embed": nn.Linear(3 * patch * patch, dim),
            "blocks": nn.ModuleList(ToyBlock(dim, heads, cross=False) for _ in range(layers)),
            "norm": nn.LayerNorm(dim),
        })
        self.fusion = nn.ModuleDict({
            "embed": nn.Embedding(vocab, dim),
            "blocks": nn.ModuleList(ToyBlock(dim, heads, cross=True) for _ in range(layers)),
        })
        self.decoder = nn.ModuleDict({
            "embed": nn.Embedding(vocab, dim),
            "blocks": nn.ModuleList(ToyBlock(dim, heads, cross=True) for _ in range(layers)),
            "norm": nn.LayerNorm(dim),
            "lm_head": nn.Linear(dim, vocab),
        })
        self.patch, self.image_size, self.vocab = patch, image_size, vocab

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor):
        p = self.patch
        patches = F.unfold(pixel_values, kernel_size=p, stride=p).transpose(1, 2)  # (B, N, 3*p*p)
        img = self.vision["patch_embed"](patches)
        for blk in self.vision["blocks"]:
            img = blk(img)
        img = self.vision["norm"](img)
        txt = self.fusion["embed"](input_ids)
        for blk in self.fusion["blocks"]:
            txt = blk(txt, img)
        dec = self.decoder["embed"](decoder_input_ids)
        for blk in self.decoder["blocks"]:
            dec = blk(dec, txt, causal=True)
        return self.decoder["lm_head"](self.decoder["norm"](dec))  # (B, T, vocab)

    def example_inputs(self, batch: int = 2, seq: int = 6, generator: torch.Generator | None = None):
        g = generator or torch.Generator().manual_seed(0)
        return (
            torch.randn(batch, 3, self.image_size, self.image_size, generator=g),
            torch.randint(0, self.vocab, (batch, seq), generator=g),
            torch.randint(0, self.vocab, (batch, seq), generator=g),
        )


TOY_ROLES = {
    "attn.q": r"\.attn\.q$", "attn.k": r"\.attn\.k$", "attn.v": r"\.attn\.v$", "attn.o": r"\.attn\.o$",
    "cross.q": r"\.cross\.q$", "cross.k": r"\.cross\.k$", "cross.v": r"\.cross\.v$", "cross.o": r"\.cross\.o$",
    "mlp.up": r"\.mlp\.fc1$", "mlp.down": r"\.mlp\.fc2$", "head": r"lm_head$",
    "embed": (r"^embed$", r"^patch_embed$"),
    "self_attention": r"\.attn$", "cross_attention": r"\.cross$",
}

TOY_BACKBONE = Backbone(
    name="toy-vlm",
    components={"vision": "vision", "fusion": "fusion", "decoder": "decoder"},
    roles=TOY_ROLES,
    builder=ToyVLM,
    description="tiny generic 3-component torch model (tests, examples of a custom role map)",
    tiny=True,
)


@hookimpl
def register_backbones(register):
    register(TOY_BACKBONE)
