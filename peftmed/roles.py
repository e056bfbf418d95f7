"""The vocabulary methods and backbones share: component names and roles.

A method asks for roles (``attn.q``, ``mlp.down``, ``norm``...), never for module names; a backbone maps
its module names to roles once (``peftmed.Backbone.roles``). ``peftmed backbones --roles NAME`` lists
what a backbone's role map matches.
"""

from __future__ import annotations

COMPONENTS = ("vision", "fusion", "decoder", "projector", "llm")

# The roles methods may ask for, with what they mean.
ROLES: dict[str, str] = {
    "attn.q": "self-attention query projection",
    "attn.k": "self-attention key projection",
    "attn.v": "self-attention value projection",
    "attn.qkv": "fused self-attention query/key/value projection",
    "attn.o": "self-attention output projection",
    "cross.q": "cross-attention query projection",
    "cross.k": "cross-attention key projection",
    "cross.v": "cross-attention value projection",
    "cross.o": "cross-attention output projection",
    "mlp.up": "feed-forward input projection(s) (incl. gate)",
    "mlp.down": "feed-forward output projection",
    "norm": "normalisation layers (LayerNorm, RMSNorm)",
    "embed": "token / patch / position embeddings",
    "patch": "patch-embedding convolution of a ViT/CLIP (LoRA wraps it as a convolution)",
    "head": "output heads (LM head, classifier)",
    "self_attention": "self-attention blocks that can take key/value prefixes",
    "cross_attention": "cross-attention blocks that can take key/value prefixes",
}

