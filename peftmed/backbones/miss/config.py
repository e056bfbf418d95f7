"""MissConfig: the sizes of a MISS model (ViT image encoder, JTM encoder, answer decoder) and its presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ...errors import ConfigError, UnknownNameError


@dataclass
class MissConfig:
    # image encoder (ViT, pre-norm blocks)
    image_size: int = 480  # input side in pixels; the patch grid is image_size // patch_size squared
    patch_size: int = 16  # side of a square patch
    vision_width: int = 768  # ViT hidden size
    vision_layers: int = 12  # ViT blocks
    vision_heads: int = 12  # ViT attention heads
    vision_mlp_ratio: float = 4.0  # ViT FFN hidden = vision_width * ratio
    # JTM encoder and answer decoder (BERT layout, post-norm, every layer cross-attends)
    text_width: int = 768  # hidden size of JTM and decoder
    text_layers: int = 12  # layers of each of JTM and decoder
    text_heads: int = 12  # attention heads of each
    intermediate_size: int = 3072  # BERT FFN hidden size
    vocab_size: int = 30524  # word-embedding rows (BERT's 30522 + [DEC] + [ENC] for BLIP checkpoints)
    max_position_embeddings: int = 512  # learned text positions
    hidden_dropout: float = 0.1  # BERT hidden-state dropout (training only)
    attention_dropout: float = 0.1  # BERT attention-probability dropout (training only)
    # task
    max_question_tokens: int = 35  # JTM input length incl. [ENC] and [SEP]; longer questions are truncated
    max_answer_tokens: int = 32  # decoder training length incl. [DEC] and [SEP]
    label_smoothing: float = 0.1  # answer cross-entropy smoothing (as BLIP / MISS train)
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # BLIP's (CLIP) statistics
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self):
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        for name in ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "text_width",
                     "text_layers", "text_heads", "intermediate_size", "vocab_size", "max_position_embeddings",
                     "max_question_tokens", "max_answer_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"miss config: {name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"miss config: image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        for width, heads, what in ((self.vision_width, self.vision_heads, "vision"),
                                   (self.text_width, self.text_heads, "text")):
            if width % heads:
                raise ConfigError(f"miss config: {what}_width={width} is not divisible by {what}_heads={heads}")
        if self.max_question_tokens < 3 or self.max_answer_tokens < 3:
            raise ConfigError("miss config: max_question_tokens and max_answer_tokens must be >= 3 "
                              "(two special tokens plus at least one word)")
        if max(self.max_question_tokens, self.max_answer_tokens) > self.max_position_embeddings:
            raise ConfigError(
                f"miss config: max_question_tokens/max_answer_tokens exceed max_position_embeddings="
                f"{self.max_position_embeddings}"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"miss config: label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ConfigError(f"miss config: image_mean/std must be 3 values (std > 0), got "
                              f"{self.image_mean} / {self.image_std}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MissConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UnknownNameError("miss config option", unknown[0], names)
        return cls(**data)


PRESETS: dict[str, dict[str, Any]] = {
    # ViT-B/16 at 480 px + BERT-base JTM and decoder: 361,478,972 parameters.
    "base": {},
    # The same graph sized for a 2-core CPU; vocab_size=None takes the trained tokenizer's size.
    "tiny": dict(image_size=64, patch_size=16, vision_width=64, vision_layers=2, vision_heads=2, text_width=64,
                 text_layers=2, text_heads=2, intermediate_size=256, vocab_size=None, max_position_embeddings=64),
}
