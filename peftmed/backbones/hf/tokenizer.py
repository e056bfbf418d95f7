"""Tokenizers for the HF backbones with nothing downloaded.

A fresh model (random weights) needs a tokenizer whose vocabulary matches its embedding table. We
train one with the ``tokenizers`` library on a small built-in medical-VQA corpus plus any texts the
caller passes (e.g. the dataset's questions and answers), and wrap it in a transformers fast tokenizer
so it saves and loads with ``save_pretrained`` / ``from_pretrained`` like any other.

- ``wordpiece_tokenizer``: BERT-style (lower-cased WordPiece, ``[CLS] text [SEP]``), for BLIP; its
  vocabulary (characters + frequent whole words) is built deterministically.
  ``[DEC]`` is the answer decoder's start token and ``[ENC]`` the encoder's, as in BLIP.
- ``bpe_tokenizer``: byte-level BPE (lossless decode), for LLaVA's language model, with ``<image>``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ...errors import ConfigError
from ..wordpiece import wordpiece_vocab

# Questions and answers in the style of VQA-RAD / SLAKE, so a fresh tokenizer splits medical words
# into few pieces even before it sees a dataset.
CORPUS: tuple[str, ...] = (
    "is there evidence of an aortic aneurysm? yes",
    "is the heart enlarged? no",
    "what organ system is imaged? chest",
    "what imaging modality was used? ct",
    "is this an mri or a ct scan? mri",
    "which side of the lung is the pleural effusion on? right",
    "is there a pneumothorax? no",
    "where is the lesion located? left temporal lobe",
    "what is the abnormality in the liver? hypodense mass",
    "are the kidneys normal? yes",
    "is there free air under the diaphragm? no",
    "what plane is this image taken in? axial",
    "is this a t1 or t2 weighted image? t2",
    "how many lesions are seen in the brain? 2",
    "is the mass enhancing with contrast? yes",
    "what structure is enlarged? spleen",
    "is there a fracture of the rib? no",
    "does the patient have cardiomegaly? yes",
    "is the trachea midline? yes",
    "what is the density of the nodule? calcified",
    "is there hydronephrosis of the left kidney? yes",
    "which lobe contains the consolidation? right lower lobe",
    "is the gallbladder distended? no",
    "what does the arrow point to? small bowel obstruction",
    "is there midline shift? no",
    "is the ventricular system dilated? yes",
    "what is seen in the colon? diverticulitis",
    "is there an infarct in the cerebellum? no",
    "where is the abscess? pancreas",
    "is the bladder wall thickened? yes",
    "what imaging sequence is this? flair",
    "is there subcutaneous emphysema? no",
    "are there bilateral infiltrates? yes",
    "what is the size of the tumor? 3 cm",
    "is this a pa or ap radiograph? pa",
    "is there atelectasis? yes",
    "what is the finding in the mediastinum? lymphadenopathy",
    "is the aorta calcified? yes",
    "was contrast given? no",
    "what part of the body is shown? abdomen",
)

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]")
LM_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")


def _texts(texts: Iterable[str] | None) -> list[str]:
    out = list(CORPUS)
    if texts is not None:
        out.extend(str(t) for t in texts)
    return out


def wordpiece_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 1000,
                        vocab_file: str | None = None):
    """A BERT WordPiece tokenizer: from ``vocab_file`` when given, else built from the corpus + ``texts``.

    Ids 0..6 are ``[PAD] [UNK] [CLS] [SEP] [MASK] [DEC] [ENC]`` in a built vocabulary.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if vocab_file is not None:
        tok = Tokenizer(models.WordPiece.from_file(str(vocab_file), unk_token="[UNK]"))
        missing = [s for s in BERT_SPECIALS[:5] if tok.token_to_id(s) is None]
        if missing:
            raise ConfigError(f"vocabulary file {vocab_file} lacks the special tokens {missing}")
        tok.add_special_tokens([s for s in BERT_SPECIALS if tok.token_to_id(s) is None])
    else:
        words = Counter(w for text in _texts(texts)
                        for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
        tok = Tokenizer(models.WordPiece(vocab=wordpiece_vocab(words, vocab_size, BERT_SPECIALS), unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    from transformers import PreTrainedTokenizerFast  # deferred: transformers takes ~1 s to import

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", bos_token="[DEC]", additional_special_tokens=["[ENC]"],
    )


def bpe_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 1000, extra: dict[str, str] | None = None):
    """A byte-level BPE tokenizer for a decoder LM, with ``<image>`` as a special token.

    Ids 0..4 are ``<pad> <unk> <s> </s> <image>``. It adds no special tokens by itself: the LLaVA
    adapter assembles ``<s> prompt ... answer </s>`` explicitly. ``extra``: more special tokens, as
    ``{tokenizer attribute: token}`` (``tokenizer.image_token`` and ``tokenizer.image_token_id`` then name
    them, as a vision-language family's processor expects); ``end`` is the eos token.
    """
    extra = dict(extra or {})
    eos = extra.pop("end", "</s>")
    specials = list(LM_SPECIALS) + [t for t in [eos, *extra.values()] if t not in LM_SPECIALS]
    specials = list(dict.fromkeys(specials))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_texts(texts), trainer=trainer)
    from transformers import PreTrainedTokenizerFast  # deferred: transformers takes ~1 s to import

    if not extra and eos == "</s>":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
            additional_special_tokens=["<image>"],
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token=eos, extra_special_tokens=extra)


def check_vocab(tokenizer, vocab_size: int, what: str) -> None:
    """A tokenizer producing ids the embedding table lacks fails here, before any training step."""
    n = len(tokenizer)
    if n > vocab_size:
        raise ConfigError(
            f"{what}: the tokenizer has {n} tokens but the model's vocabulary (config vocab_size) has "
            f"{vocab_size}; ids >= {vocab_size} would index past the embedding table. Use the tokenizer "
            f"the checkpoint was trained with, or build the model with vocab_size={n}"
        )
