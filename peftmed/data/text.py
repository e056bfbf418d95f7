"""Text as people write it, from a tokenizer's output."""

from __future__ import annotations

import re

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
