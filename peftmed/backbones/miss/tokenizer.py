"""The MISS / BLIP tokenizer: BERT WordPiece (uncased) with BLIP's extra special tokens.

Special tokens: ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (BERT) plus ``[DEC]`` (the decoder's first token,
BLIP's ``bos_token``) and ``[ENC]`` (replaces ``[CLS]`` as the first token of the JTM input). With a
BERT vocabulary file the two extra tokens get ids 30522 and 30523, as in BLIP (vocab 30524).

Without a vocabulary file a WordPiece vocabulary is trained with the ``tokenizers`` library on the
texts given (the dataset's questions and answers) or, failing those, on a small built-in corpus.
``save`` writes ``tokenizer.json`` (exact restoration) and ``vocab.txt`` (BERT format).
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ...data.text import detokenize
from ...errors import ConfigError
from ..wordpiece import wordpiece_vocab

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]")
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"

# Enough radiology question/answer text for a usable vocabulary in tests and benchmarks.
BUILTIN_CORPUS = (
    "is there evidence of an aortic aneurysm? yes",
    "is the lesion in the left or right lung? right",
    "what organ system is pictured? chest",
    "what imaging modality was used? ct",
    "is this an mri? no",
    "where is the mass located? left upper lobe",
    "are there fractures of the ribs? no",
    "is the heart enlarged? yes, cardiomegaly",
    "what is the abnormality in the brain? ring enhancing lesion",
    "is there a pneumothorax? no",
    "which side is the pleural effusion on? left",
    "is this a t1 or t2 weighted image? t2",
    "what plane is this image taken in? axial",
    "is there free air under the diaphragm? no",
    "what is the density in the right lower lobe? consolidation",
    "is the liver normal in size? hepatomegaly",
    "are the kidneys symmetric? yes",
    "is there hydronephrosis? bilateral",
    "what does the arrow point to? appendix",
    "is contrast present in the bowel? with contrast",
    "is there midline shift? yes",
    "what type of hemorrhage is present? subdural hematoma",
    "how many lesions are seen? 2",
    "is the gallbladder distended? no",
    "is there calcification in the pancreas? pancreatitis",
    "what is located in the mediastinum? lymph nodes",
    "was this x-ray taken pa or ap? pa",
    "is the trachea deviated? no",
    "are the lung fields clear? yes",
    "what is the size of the nodule? 3 cm",
    "is there bowel obstruction? small bowel",
    "which lobe of the liver is affected? right lobe",
    "is the spleen enlarged? splenomegaly",
    "does the patient have a nasogastric tube? yes",
    "is there edema around the lesion? vasogenic edema",
    "what is the finding in the sinuses? fluid level",
    "is this image of the abdomen? yes",
    "is the cerebellum involved? no",
    "what structure is abnormal? ventricles",
    "are there signs of infarction? acute infarct",
)


def _alphabet() -> list[str]:
    return list(string.ascii_lowercase + string.digits + string.punctuation)


def _assemble(model: models.Model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _finish(tok: Tokenizer) -> Tokenizer:
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # appends [DEC]/[ENC] to a plain BERT vocab
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tok


class MissTokenizer:
    """A WordPiece tokenizer with the encode/decode helpers the MISS model needs.

    ``tokenizer.backend`` is the ``tokenizers.Tokenizer`` underneath.
    """

    def __init__(self, backend: Tokenizer):
        self.backend = backend
        missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise ConfigError(f"tokenizer lacks the special tokens {missing}; MISS needs {list(SPECIAL_TOKENS)}")
        ids = {t: backend.token_to_id(t) for t in SPECIAL_TOKENS}
        self.pad_id, self.unk_id, self.cls_id = ids["[PAD]"], ids["[UNK]"], ids["[CLS]"]
        self.sep_id, self.mask_id, self.dec_id, self.enc_id = ids["[SEP]"], ids["[MASK]"], ids["[DEC]"], ids["[ENC]"]

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_vocab_file(cls, path: str | Path) -> MissTokenizer:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"vocabulary file {str(path)!r} does not exist (expected a BERT vocab.txt)")
        return cls(_finish(_assemble(models.WordPiece.from_file(str(path), unk_token="[UNK]"))))

    @classmethod
    def train(cls, texts: Iterable[str] | None = None, vocab_size: int = 30524, min_frequency: int = 1) -> MissTokenizer:
        """Train a WordPiece vocabulary (at most ``vocab_size`` tokens) on ``texts`` (default: a built-in corpus)."""
        texts = list(texts) if texts is not None else list(BUILTIN_CORPUS)
        if not texts:
            raise ConfigError("cannot train a tokenizer on no text; pass questions and answers (or None)")
        if vocab_size < len(SPECIAL_TOKENS) + len(_alphabet()):
            raise ConfigError(f"vocab_size={vocab_size} is too small: it must hold {len(SPECIAL_TOKENS)} special "
                              f"tokens and the {len(_alphabet())}-character alphabet")
        # deterministic (tokenizers' WordPieceTrainer is not): same text -> same ids, every run
        pre, norm = pre_tokenizers.BertPreTokenizer(), normalizers.BertNormalizer(lowercase=True)
        words = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
        counts = {w: c for w, c in words.items() if c >= min_frequency}
        vocab = wordpiece_vocab(Counter(counts), vocab_size, SPECIAL_TOKENS, _alphabet())
        tok = _assemble(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
        return cls(_finish(tok))

    @classmethod
    def load(cls, folder: str | Path) -> MissTokenizer:
        """From a folder holding ``tokenizer.json`` (preferred) or a BERT ``vocab.txt``."""
        folder = Path(folder)
        if (folder / TOKENIZER_FILE).is_file():
            return cls(Tokenizer.from_file(str(folder / TOKENIZER_FILE)))
        if (folder / VOCAB_FILE).is_file():
            return cls.from_vocab_file(folder / VOCAB_FILE)
        raise ConfigError(f"no tokenizer in {str(folder)!r}: expected {TOKENIZER_FILE} or {VOCAB_FILE}")

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / TOKENIZER_FILE))
        vocab = self.backend.get_vocab(with_added_tokens=True)
        by_id = sorted(vocab.items(), key=lambda kv: kv[1])
        (folder / VOCAB_FILE).write_text("".join(f"{t}\n" for t, _ in by_id), encoding="utf-8")

    # ---- use ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=with_added_tokens)

    def encode(self, texts: Sequence[str], max_tokens: int, first: int | None = None):
        """Token ids ``[CLS] text [SEP]`` padded to the longest, with ``[CLS]`` replaced by ``first``.

        Returns ``(ids (B, T) long, mask (B, T) bool, truncated: int)``; a text longer than
        ``max_tokens`` keeps its first ``max_tokens - 1`` tokens and its ``[SEP]``.
        """
        encodings = self.backend.encode_batch([str(t) for t in texts])
        rows, truncated = [], 0
        for enc in encodings:
            ids = list(enc.ids)
            if len(ids) > max_tokens:
                ids, truncated = ids[: max_tokens - 1] + [self.sep_id], truncated + 1
            if first is not None:
                ids[0] = first
            rows.append(ids)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return ids, ids != self.pad_id, truncated

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` up to the first ``[SEP]``, special tokens dropped, punctuation spaced as written
        (``peftmed.data.text.detokenize``)."""
        ids = [int(i) for i in ids]
        if self.sep_id in ids:
            ids = ids[: ids.index(self.sep_id)]
        return detokenize(self.backend.decode(ids, skip_special_tokens=True))

    def tokenize(self, text: str) -> list[str]:
        return self.backend.encode(text, add_special_tokens=False).tokens

    def __repr__(self) -> str:
        return f"MissTokenizer(vocab={len(self)})"
