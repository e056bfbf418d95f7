"""The building blocks of MISS, named as in BLIP's checkpoints (so loading is a key rename, not a remap).

- ViT (``visual_encoder``): pre-norm blocks ``norm1 -> attn(q, k, v, proj) -> norm2 -> mlp(fc1, fc2)``.
  BLIP fuses q/k/v into one ``qkv`` linear; here they are separate ``nn.Linear`` so roles (LoRA on q
  and v) address them; the checkpoint loader splits/fuses.
- BERT (``text_encoder`` = JTM, ``text_decoder.bert``): post-norm layers with
  ``attention.self.{query,key,value}``, ``attention.output.{dense,LayerNorm}``, the same under
  ``crossattention``, ``intermediate.dense``, ``output.{dense,LayerNorm}``.

Every attention goes through :func:`peftmed.attention.attend` and follows its prefix protocol
(``num_heads``, ``head_dim``, ``prefix_provider``), so prompt-family methods and the
``prefix_attention`` kernel plug in. Cross-attention can be *grouped*: ``group`` rows of the query
batch (beams, ranked candidates) share one sample's keys/values, which are computed once per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...attention import attend


class AttentionCore(nn.Module):
    """Multi-head softmax attention core (no projections of its own) following the prefix protocol."""

    def __init__(self, num_heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim, self.dropout_p = num_heads, head_dim, dropout
        self.prefix_provider = None  # set by prompt-family methods: () -> (prefix_k, prefix_v)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def attend(self, q, k, v, attn_mask=None, causal=False, group: int = 1) -> torch.Tensor:
        """q (B*group, H, Tq, D) over k/v (B, H, Tk, D); returns (B*group, Tq, H*D)."""
        prefix = self.prefix_provider() if self.prefix_provider is not None else None
        dropout = self.dropout_p if self.training else 0.0
        bq, h, tq, d = q.shape
        if group > 1:  # fold the group into the query length: its rows share the keys/values
            q = q.view(bq // group, group, h, tq, d).transpose(1, 2).reshape(bq // group, h, group * tq, d)
        out = attend(q, k, v, prefix=prefix, attn_mask=attn_mask, causal=causal, dropout_p=dropout)
        if group > 1:
            out = out.view(bq // group, h, group, tq, d).transpose(1, 2).reshape(bq, h, tq, d)
        return out.transpose(1, 2).reshape(bq, tq, h * d)  # (B, T, H*D)


# ---- ViT ----------------------------------------------------------------------------------------
class ViTAttention(AttentionCore):
    def __init__(self, dim: int, heads: int):
        super().__init__(heads, dim // heads)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(self.q(x)), self.split_heads(self.k(x)), self.split_heads(self.v(x))
        return self.proj(self.attend(q, k, v))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), ViTAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int, patch: int, dim: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (B, 1 + N, C)


# ---- BERT ---------------------------------------------------------------------------------------
class BertSelfAttention(AttentionCore):
    def __init__(self, width: int, heads: int, kv_width: int, dropout: float):
        super().__init__(heads, width // heads, dropout)
        self.query = nn.Linear(width, width)
        self.key, self.value = nn.Linear(kv_width, width), nn.Linear(kv_width, width)

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, T, D) of ``context``; cached by generation for cross-attention."""
        return self.split_heads(self.key(context)), self.split_heads(self.value(context))

    def forward(self, hidden, context=None, attn_mask=None, causal=False, kv=None, group: int = 1):
        k, v = kv if kv is not None else self.kv(hidden if context is None else context)
        return self.attend(self.split_heads(self.query(hidden)), k, v, attn_mask=attn_mask, causal=causal,
                           group=group)


class BertSelfOutput(nn.Module):
    """dense -> dropout -> LayerNorm(residual + .): used after attention (and as BertOutput after the FFN)."""

    def __init__(self, width_in: int, width: int, dropout: float):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(width_in, width), nn.LayerNorm(width, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertAttention(nn.Module):
    def __init__(self, width: int, heads: int, kv_width: int, cfg):
        super().__init__()
        self.self = BertSelfAttention(width, heads, kv_width, cfg.attention_dropout)
        self.output = BertSelfOutput(width, width, cfg.hidden_dropout)

    def forward(self, hidden, **kwargs):
        return self.output(self.self(hidden, **kwargs), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(width, hidden)

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """Self-attention, cross-attention to ``context``, FFN; post-norm (BERT)."""

    def __init__(self, cfg, kv_width: int):
        super().__init__()
        w, h = cfg.text_width, cfg.text_heads
        self.attention = BertAttention(w, h, w, cfg)
        self.crossattention = BertAttention(w, h, kv_width, cfg)
        self.intermediate = BertIntermediate(w, cfg.intermediate_size)
        self.output = BertSelfOutput(cfg.intermediate_size, w, cfg.hidden_dropout)

    def forward(self, hidden, attn_mask, context, context_mask, causal=False, cross_kv=None, group: int = 1):
        hidden = self.attention(hidden, attn_mask=attn_mask, causal=causal)
        hidden = self.crossattention(hidden, context=context, attn_mask=context_mask, kv=cross_kv, group=group)
        return self.output(self.intermediate(hidden), hidden)


class BertEmbeddings(nn.Module):
    """Word + learned position embeddings, LayerNorm (no token types, as BLIP's med BERT)."""

    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.text_width)
        self.LayerNorm = nn.LayerNorm(cfg.text_width, eps=1e-12)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.dropout(self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(pos)))


class BertEncoder(nn.Module):
    def __init__(self, cfg, kv_width: int):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg, kv_width) for _ in range(cfg.text_layers))


class BertModel(nn.Module):
    """BERT with cross-attention in every layer, no pooler (BLIP's ``BertModel(add_pooling_layer=False)``)."""

    def __init__(self, cfg, kv_width: int):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg, kv_width)

    def forward(self, input_ids, attn_mask, context, context_mask=None, causal=False, cross_kv=None, group: int = 1):
        hidden = self.embeddings(input_ids)
        for i, layer in enumerate(self.encoder.layer):
            hidden = layer(hidden, attn_mask, context, context_mask, causal=causal,
                           cross_kv=None if cross_kv is None else cross_kv[i], group=group)
        return hidden

    def cross_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer.crossattention.self.kv(context) for layer in self.encoder.layer]


class PredictionTransform(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(width, width), nn.LayerNorm(width, eps=1e-12)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMPredictions(nn.Module):
    def __init__(self, width: int, vocab: int):
        super().__init__()
        self.transform = PredictionTransform(width)
        self.decoder = nn.Linear(width, vocab)  # weight tied to the word embeddings; own bias (BLIP's cls.predictions.bias)

    def forward(self, x):
        return self.decoder(self.transform(x))


class LMHead(nn.Module):
    def __init__(self, width: int, vocab: int):
        super().__init__()
        self.predictions = LMPredictions(width, vocab)

    def forward(self, x):
        return self.predictions(x)


class BertLMHeadModel(nn.Module):
    """The answer decoder: causal BERT cross-attending to the JTM, plus the tied LM head."""

    def __init__(self, cfg, kv_width: int):
        super().__init__()
        self.bert = BertModel(cfg, kv_width)
        self.cls = LMHead(cfg.text_width, cfg.vocab_size)
        self.tie_weights()

    def tie_weights(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids, attn_mask, context, context_mask, cross_kv=None, group: int = 1):
        hidden = self.bert(input_ids, attn_mask, context, context_mask, causal=True, cross_kv=cross_kv, group=group)
        return self.cls(hidden)  # (B, T, vocab)
