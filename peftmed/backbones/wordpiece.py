"""A deterministic WordPiece vocabulary, shared by the BERT-style tokenizers of the backbones.

``tokenizers``' WordPieceTrainer breaks frequency ties in hash-map order, so two trainings on the
same text give different ids; a model rebuilt from the same seed and text would then not match its
saved adapter. This builder orders everything explicitly instead.
"""

from __future__ import annotations

import re
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


_DETOKENIZE = (
    (re.compile(r"(?<=\d) ?\. ?(?=\d)"), "."),  # "3. 4" -> "3.4"
    (re.compile(r" ?([-/']) ?"), r"\1"),  # "x - ray" -> "x-ray", "t1 / t2" -> "t1/t2", "patient ' s" -> "patient's"
    (re.compile(r"([(\[~$#]) "), r"\1"),  # "( dwi" -> "(dwi"
    (re.compile(r" ([)\]%,;:.?!])"), r"\1"),  # "dwi )" -> "dwi)", "5 %" -> "5%"
)


def detokenize(text: str) -> str:
    """Readable text from a word-piece decoder, which puts a space around every punctuation token: the
    usual written forms of answers and reports (decimals, hyphenated and slashed words, brackets,
    percentages). Spacing a decoder cannot know is ignored when answers are compared
    (``peftmed.data.normalize_answer``)."""
    for pattern, repl in _DETOKENIZE:
        text = pattern.sub(repl, text)
    return text.strip()
