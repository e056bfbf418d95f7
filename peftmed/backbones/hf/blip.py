"""``hf-blip-vqa``: transformers' ``BlipForQuestionAnswering`` behind peftmed's VQA task protocol.

Components: ``vision`` = the ViT (``vision_model``), ``fusion`` = the question encoder cross-attending
to the image (``text_encoder``), ``decoder`` = the answer LM cross-attending to the question
(``text_decoder``). The forward pass is assembled from these three parts (not the HF ``forward``) so
that training and generation see the same masks and the same start token: the answer sequence is
``[DEC] answer [SEP]`` with ``[DEC]`` = ``text_config.bos_token_id``, as generation starts from it.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ...data.text import detokenize
from ...errors import ConfigError
from ..base import Backbone, TextLimits
from .common import (
    CLIP_MEAN, CLIP_STD, VQAModule, load_tokenizer, load_weights, local_folder, read_image_stats, saved_tokenizer,
    preset_spec, seeded_model,
)
from .prefix import make_prefix_capable
from .tokenizer import check_vocab, wordpiece_tokenizer

# Sizes of the presets; "base" is Salesforce/blip-vqa-base's layout (ViT-B/16 at 384, BERT-base).
PRESETS: dict[str, dict] = {
    "tiny": {
        # BlipVisionConfig initialises with std 1e-10 (pretrained weights replace it). A model trained from
        # scratch needs a real std, and at width 32 the BERT-size 0.02 leaves the image's effect on the
        # answer logits near 1e-5; ~1/sqrt(width) lets it (and an adapter on the ViT) show.
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8, initializer_range=0.15),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64, initializer_range=0.15),
        "vocab_size": 400,  # target size of the trained WordPiece vocabulary
    },
    "base": {
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=384, patch_size=16, initializer_range=0.02),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=512, vocab_size=30524),
        "vocab_size": 30000,
    },
}


class HFBlipVQA(VQAModule):
    """BlipForQuestionAnswering (at ``.model``) with a tokenizer, image statistics and the VQA protocol.

    ``max_question_tokens`` counts the encoder input with ``[CLS]``/``[SEP]`` (35, as MISS); answers
    are cut to ``max_answer_tokens`` word pieces for the loss.
    """

    processor_type = "BlipImageProcessor"

    def __init__(self, model, tokenizer, *, image_size: int | None = None, image_mean=CLIP_MEAN,
                 image_std=CLIP_STD, max_question_tokens: int = 35, max_answer_tokens: int = 10):
        text = model.config.text_config
        check_vocab(tokenizer, text.vocab_size, "hf-blip-vqa")
        super().__init__(model, tokenizer, image_size or model.config.vision_config.image_size,
                         image_mean, image_std, max_question_tokens)
        self.max_answer_tokens = int(max_answer_tokens)
        self.bos_id, self.sep_id, self.pad_id = text.bos_token_id, text.sep_token_id, text.pad_token_id
        for label, tid in (("bos_token_id", self.bos_id), ("sep_token_id", self.sep_id), ("pad_token_id", self.pad_id)):
            if tid is None or not 0 <= tid < text.vocab_size:
                raise ConfigError(f"hf-blip-vqa: text_config.{label}={tid} is not a token id below "
                                  f"vocab_size={text.vocab_size}")

    def text_limits(self, prompt: str) -> TextLimits:
        positions = self.model.config.text_config.max_position_embeddings
        return TextLimits(self, "max_answer_tokens", 0, positions - 2, "use a text config with more positions")

    def answer_tokens(self, answer: str) -> int:
        """How many tokens generation must produce to write ``answer`` (its word pieces; [DEC] and [SEP] aside)."""
        return len(self.tokenizer(str(answer), add_special_tokens=False)["input_ids"])

    # ---- encoding ---------------------------------------------------------------------------------
    def _questions(self, questions: list[str]):
        full = self.tokenizer(list(questions))["input_ids"]
        self._count_truncated([len(ids) for ids in full], self.max_question_tokens)
        enc = self.tokenizer(list(questions), padding=True, truncation=True, max_length=self.max_question_tokens,
                             return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def encode(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """image -> ViT -> question encoder; returns the question states (B, T, D) and their mask."""
        if len(batch["questions"]) != batch["images"].shape[0]:
            raise ConfigError(f"batch has {batch['images'].shape[0]} images but {len(batch['questions'])} questions")
        pixels = self.pixel_values(batch["images"])
        image_embeds = self.model.vision_model(pixel_values=pixels)[0]  # (B, 1+N, Dv)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        ids, mask = self._questions(batch["questions"])
        question = self.model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                           encoder_attention_mask=image_mask)[0]  # (B, T, D)
        return question, mask

    def _answers(self, answers: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pieces = self.tokenizer(list(answers), add_special_tokens=False)["input_ids"]
        seqs = [[self.bos_id] + ids[: self.max_answer_tokens] + [self.sep_id] for ids in pieces]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return ids.to(self.device), mask.to(self.device), labels.to(self.device)

    # ---- task protocol ------------------------------------------------------------------------------
    def compute_loss(self, batch) -> torch.Tensor:
        """Answer cross-entropy (the text config's label smoothing), teacher-forced after ``[DEC]``."""
        return self(batch)["loss"]

    def loss_terms(self, batch) -> tuple[torch.Tensor, int]:
        """(sum of the answer tokens' cross-entropy, number of answer tokens), for token-normalised training."""
        out = self._decode(batch, "sum")
        return out["loss"], out["tokens"]

    def forward(self, batch) -> dict[str, torch.Tensor]:
        """``{"loss": scalar, "logits": (B, T, vocab)}`` of the teacher-forced answers."""
        out = self._decode(batch, "mean")
        return {"loss": out["loss"], "logits": out["logits"]}

    def _decode(self, batch, reduction: str) -> dict:
        if len(batch.get("answers") or ()) != len(batch["questions"]):
            raise ConfigError("the loss needs one answer per question in batch['answers']")
        question, q_mask = self.encode(batch)
        ids, mask, labels = self._answers(batch["answers"])
        out = self.model.text_decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=question,
                                      encoder_attention_mask=q_mask, labels=labels, reduction=reduction)
        return {"loss": out.loss, "logits": out.logits, "tokens": int((labels[:, 1:] != -100).sum())}

    @torch.no_grad()
    def generate(self, batch, max_new_tokens: int = 10, num_beams: int = 3) -> list[str]:
        """Answers by beam search (``num_beams=1``: greedy), stopping at ``[SEP]``."""
        was_training = self.training
        self.eval()
        try:
            question, q_mask = self.encode(batch)
            start = torch.full((question.shape[0], 1), self.bos_id, dtype=torch.long, device=question.device)
            out = self.model.text_decoder.generate(
                input_ids=start, encoder_hidden_states=question, encoder_attention_mask=q_mask,
                eos_token_id=self.sep_id, pad_token_id=self.pad_id, max_new_tokens=max_new_tokens,
                num_beams=num_beams, do_sample=False,
            )
        finally:
            self.train(was_training)
        return [detokenize(t) for t in self.tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)]


def blip_config(preset: str = "tiny", vocab_size: int | None = None, image_size: int | None = None,
                vision_layers: int | None = None, text_layers: int | None = None, **ids):
    from transformers import BlipConfig

    spec = preset_spec(PRESETS, preset, "hf-blip-vqa", image_size, vision_layers, text_layers)
    text = dict(spec["text"], **ids)
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    return BlipConfig(vision_config=spec["vision"], text_config=text)


def build(preset: str = "tiny", config=None, tokenizer=None, texts=None, vocab_file: str | None = None,
          image_size: int | None = None, max_question_tokens: int = 35, max_answer_tokens: int = 10,
          seed: int | None = 0, vision_layers: int | None = None, text_layers: int | None = None) -> HFBlipVQA:
    """A fresh (randomly initialised) BLIP VQA model with a tokenizer; nothing is downloaded.

    ``config``: a ``BlipConfig`` (overrides ``preset``); ``tokenizer``: any fast tokenizer whose size fits
    the config; otherwise a WordPiece tokenizer is read from ``vocab_file`` or built from the built-in
    corpus plus ``texts`` and the tiny preset's vocabulary is sized to it exactly.
    """
    from transformers import BlipForQuestionAnswering

    if tokenizer is None:
        target = PRESETS.get(preset, PRESETS["tiny"])["vocab_size"]
        tokenizer = wordpiece_tokenizer(texts, vocab_size=target, vocab_file=vocab_file)
    ids = dict(bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if config is None:
        fixed_vocab = "vocab_size" in PRESETS.get(preset, {}).get("text", {})
        config = blip_config(preset, vocab_size=None if fixed_vocab else len(tokenizer), image_size=image_size,
                             vision_layers=vision_layers, text_layers=text_layers, **ids)
    elif image_size is not None and image_size != config.vision_config.image_size:
        raise ConfigError(f"hf-blip-vqa: image_size={image_size} disagrees with the config's "
                          f"vision_config.image_size={config.vision_config.image_size}")
    model = seeded_model(BlipForQuestionAnswering, config, seed)
    return HFBlipVQA(model, tokenizer, max_question_tokens=max_question_tokens, max_answer_tokens=max_answer_tokens)


def load(path: str | os.PathLike, max_question_tokens: int = 35, max_answer_tokens: int = 10,
         strict: bool = True) -> HFBlipVQA:
    """Load a local folder (``save_pretrained`` output or a downloaded BLIP VQA checkpoint).

    Missing or shape-mismatched weights are an error with ``strict`` (the default), never dropped silently.
    """
    from transformers import BlipForQuestionAnswering

    folder = local_folder(path, "hf-blip-vqa")
    tokenizer = load_tokenizer(folder, "hf-blip-vqa")
    model = load_weights(BlipForQuestionAnswering, folder, "hf-blip-vqa", strict)
    size, mean, std = read_image_stats(folder, model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD)
    return HFBlipVQA(model, tokenizer, image_size=size, image_mean=mean, image_std=std,
                     max_question_tokens=max_question_tokens, max_answer_tokens=max_answer_tokens)


def _text_roles(decoder: bool) -> dict:
    roles = {
        "attn.q": r"\.attention\.self\.query$", "attn.k": r"\.attention\.self\.key$",
        "attn.v": r"\.attention\.self\.value$", "attn.o": r"\.attention\.output\.dense$",
        "cross.q": r"crossattention\.self\.query$", "cross.k": r"crossattention\.self\.key$",
        "cross.v": r"crossattention\.self\.value$", "cross.o": r"crossattention\.output\.dense$",
        "mlp.up": r"\.intermediate\.dense$", "mlp.down": r"layer\.\d+\.output\.dense$",
        "embed": r"embeddings\.(word|position)_embeddings$",
        "self_attention": r"\.attention\.self$", "cross_attention": r"crossattention\.self$",
    }
    if decoder:
        roles["head"] = r"cls\.predictions\.decoder$"
    return roles


VISION_ROLES = {
    "attn.qkv": r"self_attn\.qkv$", "attn.o": r"self_attn\.projection$",
    "mlp.up": r"mlp\.fc1$", "mlp.down": r"mlp\.fc2$",
    "embed": r"^embeddings$",  # patch conv + class token + position table
    "patch": r"^embeddings\.patch_embedding$",
    "self_attention": r"self_attn$",
}

BACKBONE = Backbone(
    name="hf-blip-vqa",
    components={"vision": "model.vision_model", "fusion": "model.text_encoder", "decoder": "model.text_decoder"},
    component_roles={"vision": VISION_ROLES, "fusion": _text_roles(False), "decoder": _text_roles(True)},
    builder=build,
    loader=load,
    prefix_wrapper=make_prefix_capable,
    tokenizer_loader=saved_tokenizer,
    description="transformers BlipForQuestionAnswering (vision | question encoder | answer decoder)",
    tasks=("vqa", "report"),
    depth_options={"vision_layers": ("vision",), "text_layers": ("fusion", "decoder")},
    defaults={"max_question_tokens": 35},
    tiny=True,  # the default build is the tiny preset (the conformance kit runs on it)
)

# Salesforce/blip-vqa-base's architecture by name (load its weights with --pretrained FOLDER)
PRESET_BACKBONES = (
    dataclasses.replace(BACKBONE, name="blip-vqa-base", defaults={**BACKBONE.defaults, "preset": "base"}, tiny=False,
                        description="BLIP VQA base: ViT-B/16 @384 + BERT-base question encoder + answer decoder "
                                    "(361M params)"),
)
