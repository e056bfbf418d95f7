"""How the transformers backbones' attention takes a key/value prefix: wrappers, one instance at a time.

transformers' attention classes do not follow peftmed's prefix protocol (``num_heads``, ``head_dim``,
``prefix_provider``; see peftmed.attention). The hf backbones declare :func:`make_prefix_capable` as
their ``Backbone.prefix_wrapper``: the prompt-family methods call it for a matched attention module, and
it returns a :class:`PrefixCapableAttention` wrapper to put in the module's place, which

- holds the original's children under the same names (``query``/``key``/``value``, ``q_proj``...,
  ``qkv``), so state-dict keys, role patterns and LoRA on the projections keep working;
- runs the original class's own forward while no prefix is set (bit-for-bit the original model);
- with a prefix, recomputes attention through ``peftmed.attention.attend`` with the prefix
  prepended to the keys/values *after* any key/value cache and rotary embedding: the prefix is never
  cached, never rotated (it has no position) and is broadcast over the batch and beams.

Nothing is patched process-wide: the library classes are untouched, and :meth:`PrefixCapableAttention.restore`
puts the original instance back (with whatever wrappers other methods placed on its children since).

Covered: BLIP vision (fused ``qkv``), BLIP text self/cross attention incl. the decoder's
EncoderDecoderCache, CLIP (LLaVA's vision tower), Llama (LLaVA's LLM; rotary, grouped KV heads, cache).

Any other attention that calls transformers' attention interface (``ALL_ATTENTION_FUNCTIONS``: Qwen2/2.5/3-VL's
text attention with its multimodal rotary positions, Gemma 3 with sliding windows and q/k norms, Mistral, SigLIP,
InternViT, Idefics3, Mllama...) is covered generically: with a prefix set, the original class's forward runs
(its projections, norms, rotary positions and cache, unchanged) with ``peftmed_prefix`` as its attention
function, which attends over [prefix; keys]. The prefix keys therefore take no rotation, as above; the model's
own keys keep theirs. Refused: attention with logit soft-capping, and vision attention over packed variable-length
sequences (Qwen's vision towers), where one prefix per image is not what the packed call sees.
"""

from __future__ import annotations

import copy
import inspect
import sys

import torch
from torch import nn

from ...attention import attend

# original class name -> forward-with-prefix implementation (a function of (wrapper, *args, **kwargs))
_FORWARDS: dict[str, callable] = {}


def _forward_for(name: str):
    def deco(fn):
        _FORWARDS[name] = fn
        return fn

    return deco


def _bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """transformers' masks are additive floats (0 = attend, a large negative = masked) or booleans
    (True = attend); attend() takes booleans."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2 if mask.is_floating_point() else mask > 0


def is_supported(module: nn.Module) -> bool:
    if isinstance(module, PrefixCapableAttention):
        return False
    return type(module).__name__ in _FORWARDS or _uses_attention_interface(module)


INTERFACE = "peftmed_prefix"
_interface_checked: dict[type, bool] = {}


def _uses_attention_interface(module: nn.Module) -> bool:
    """Whether ``module``'s forward picks its attention function from transformers' interface by config (and
    takes one query/key/value set per sequence: packed variable-length vision attention does not)."""
    cls = type(module)
    if cls not in _interface_checked:
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        config = getattr(module, "config", None)
        _interface_checked[cls] = ("ALL_ATTENTION_FUNCTIONS" in src and "cu_seqlens" not in src
                                   and config is not None and hasattr(config, "_attn_implementation"))
    return _interface_checked[cls]


def _heads(module: nn.Module) -> tuple[int, int]:
    config = getattr(module, "config", None)
    heads = getattr(module, "num_heads", None) or getattr(config, "num_attention_heads", None) \
        or getattr(config, "attention_heads", None)
    dim = getattr(module, "head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(heads), int(dim)


def _prefix_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                      is_causal=None, **kwargs):
    """transformers attention-interface function: attention of ``query`` over [prefix; ``key``] (keys rotated and
    cached by the caller; the prefix unrotated, always visible). Returns (B, T, H, D) as the interface does."""
    prefix = module.prefix_provider() if getattr(module, "prefix_provider", None) is not None else None
    if softcap is not None:
        raise NotImplementedError(f"{type(module).__name__}: a key/value prefix with attention logit soft-capping "
                                  f"is not supported")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped KV heads: the prefix has one key/value per query head
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    mask = attention_mask
    if mask is not None and mask.dim() == 4:
        mask = mask[:, :, :, : key.shape[-2]]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and mask is None and query.shape[2] > 1
    out = attend(query, key, value, prefix=prefix, attn_mask=_bool_mask(mask), causal=causal,
                 dropout_p=dropout if module.training else 0.0, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register_interface() -> None:
    from transformers import AttentionInterface

    if INTERFACE not in AttentionInterface._global_mapping:
        AttentionInterface.register(INTERFACE, _prefix_attention)


def _generic_forward(self, prefix, *args, **kwargs):
    """The original class's forward with ``peftmed_prefix`` as its attention function (see the module docstring)."""
    _register_interface()
    config = copy.copy(object.__getattribute__(self, "original").config)
    config._attn_implementation_internal = INTERFACE
    self.__dict__["config"] = config
    try:
        return type(self.original).forward(self, *args, **kwargs)
    finally:
        del self.__dict__["config"]


class PrefixCapableAttention(nn.Module):
    """A prefix-capable stand-in for one transformers attention module (see the module docstring).

    Instances are of a subclass made per original class (``PrefixBlipAttention`` is a
    PrefixCapableAttention and a BlipAttention), so role patterns and code that test ``isinstance`` still
    recognise them. The prompt methods use ``prefix_users`` (which prompt modules use it) and ``restore()``
    (put the original back when none does).
    """

    def __init__(self, original: nn.Module, num_heads: int, head_dim: int, max_positions: int | None):
        nn.Module.__init__(self)  # not the original class's __init__: nothing is built anew
        object.__setattr__(self, "original", original)  # not a submodule: its parameters are ours already
        # straight into the registries: add_module's hasattr check would see the original's attributes
        self._modules.update(original._modules)
        self._parameters.update(original._parameters)
        self._buffers.update(original._buffers)
        self.train(original.training)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.max_positions = max_positions
        self.prefix_provider = None
        self.prefix_users: set[int] = set()  # ids of the PromptModules using this wrapper
        self._prefix_forward = _FORWARDS.get(type(original).__name__, _generic_forward)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # config, layer_idx, scaling, is_causal...: the original's attributes
            return getattr(object.__getattribute__(self, "original"), name)

    def forward(self, *args, **kwargs):
        prefix = self.prefix_provider() if self.prefix_provider is not None else None
        if prefix is None or prefix[0].shape[-2] == 0:
            return type(self.original).forward(self, *args, **kwargs)
        return self._prefix_forward(self, prefix, *args, **kwargs)

    def restore(self) -> nn.Module:
        """The original module, with this wrapper's current children (possibly wrapped since) put back."""
        for name, child in self.named_children():
            setattr(self.original, name, child)
        return self.original

    def extra_repr(self) -> str:
        return f"wraps {type(self.original).__name__}, heads={self.num_heads}, head_dim={self.head_dim}"


def make_prefix_capable(module: nn.Module) -> PrefixCapableAttention | None:
    """A PrefixCapableAttention wrapping ``module``, or None when its type is not covered."""
    if not is_supported(module):
        return None
    name = type(module).__name__
    config = getattr(module, "config", None)
    if name == "BlipTextSelfAttention":
        heads, dim = module.num_attention_heads, module.attention_head_size
    elif name == "LlamaAttention":
        heads, dim = module.config.num_attention_heads, module.head_dim
    elif name in _FORWARDS:
        heads, dim = module.num_heads, module.head_dim
    else:
        heads, dim = _heads(module)
    max_positions = getattr(config, "max_position_embeddings", None)
    return _wrapper_class(type(module))(module, heads, dim, max_positions)


_CLASSES: dict[type, type] = {}


def _wrapper_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Prefix{cls.__name__}", (PrefixCapableAttention, cls), {"__module__": __name__})
    return _CLASSES[cls]


# ---- forwards with a prefix ----------------------------------------------------------------------


@_forward_for("BlipAttention")
def _blip_vision(self, prefix, hidden_states, **kwargs):
    b, t, c = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, T, D)
    p = self.dropout.p if self.training else 0.0
    out = attend(q, k, v, prefix=prefix, dropout_p=p, scale=self.scale)
    return self.projection(out.transpose(1, 2).reshape(b, t, c)), None


@_forward_for("BlipTextSelfAttention")
def _blip_text(self, prefix, hidden_states, attention_mask=None, encoder_hidden_states=None,
               encoder_attention_mask=None, past_key_values=None, **kwargs):
    from transformers.cache_utils import EncoderDecoderCache

    # Same cache logic as the original; the prefix joins only inside attend(), so the cache never holds it.
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q = self.query(hidden_states).view(shape).transpose(1, 2)
    cross = encoder_hidden_states is not None
    mask = encoder_attention_mask if cross else attention_mask
    cache, updated = past_key_values, False
    if past_key_values is not None and isinstance(past_key_values, EncoderDecoderCache):
        updated = past_key_values.is_updated.get(self.layer_idx)
        cache = past_key_values.cross_attention_cache if cross else past_key_values.self_attention_cache
    states = encoder_hidden_states if cross else hidden_states
    if cross and past_key_values is not None and updated:
        k, v = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
    else:
        kv_shape = (*states.shape[:-1], -1, self.head_dim)
        k = self.key(states).view(kv_shape).transpose(1, 2)
        v = self.value(states).view(kv_shape).transpose(1, 2)
        if past_key_values is not None:
            k, v = cache.update(k, v, self.layer_idx)
            if cross and isinstance(past_key_values, EncoderDecoderCache):
                past_key_values.is_updated[self.layer_idx] = True
    p = self.dropout.p if self.training else 0.0
    out = attend(q, k, v, prefix=prefix, attn_mask=_bool_mask(mask), dropout_p=p)
    out = out.permute(0, 2, 1, 3).reshape(*hidden_states.shape[:-1], self.num_heads * self.head_dim)
    return out, None


@_forward_for("CLIPAttention")
def _clip(self, prefix, hidden_states, attention_mask=None, **kwargs):
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    p = self.dropout if self.training else 0.0
    out = attend(q, k, v, prefix=prefix, attn_mask=_bool_mask(attention_mask), dropout_p=p,
                 causal=bool(getattr(self.original, "is_causal", False)) and attention_mask is None,
                 scale=self.scale)
    return self.out_proj(out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)), None


@_forward_for("LlamaAttention")
def _llama(self, prefix, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
           **kwargs):
    modeling = sys.modules[type(self.original).__module__]
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = modeling.apply_rotary_pos_emb(q, k, cos, sin)  # the prefix keys stay unrotated: no position
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    groups = self.num_key_value_groups
    if groups > 1:  # grouped KV heads: the prefix has one key/value per query head
        k, v = modeling.repeat_kv(k, groups), modeling.repeat_kv(v, groups)
    p = self.attention_dropout if self.training else 0.0
    # transformers passes mask=None for a plain causal prefill (sdpa's is_causal path)
    causal = attention_mask is None and q.shape[-2] > 1
    out = attend(q, k, v, prefix=prefix, attn_mask=_bool_mask(attention_mask), causal=causal, dropout_p=p,
                 scale=self.scaling)
    return self.o_proj(out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1).contiguous()), None
