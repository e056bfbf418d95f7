"""A deterministic WordPiece vocabulary, shared by the BERT-style tokenizers of the backbones.

``tokenizers``' WordPieceTrainer breaks frequency ties in hash-map order, so two trainings on the
same text give different ids; a model rebuilt from the same seed and text would then not match its
saved adapter. This builder orders everything explicitly instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from ..errors import ConfigError


def wordpiece_vocab(words: Counter, vocab_size: int, specials: Sequence[str],
                    alphabet: Iterable[str] = ()) -> dict[str, int]:
    """Specials, every character (word-initial and ``##`` continuation), then whole words by frequency
    (ties broken alphabetically), up to ``vocab_size`` tokens."""
    chars = sorted({c for w in words for c in w} | set(alphabet))
    base = list(specials) + [c for c in chars if c not in specials] + [f"##{c}" for c in chars]
    if vocab_size < len(base):
        raise ConfigError(f"vocab_size={vocab_size} is below the {len(base)} special and character tokens the "
                          f"texts need")
    ranked = sorted((w for w in words if len(w) > 1 and w not in base), key=lambda w: (-words[w], w))
    tokens = base + ranked[: vocab_size - len(base)]
    return {t: i for i, t in enumerate(tokens)}
