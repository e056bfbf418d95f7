"""MissForVQA: the MISS generative Med-VQA model (BLIP lineage) and the VQA task protocol it implements.

    image (uint8, B x 3 x S x S) -> visual_encoder (ViT)                 -> image tokens (B, 1 + N, Cv)
    "[ENC] question [SEP]"        -> text_encoder (JTM, cross-attends image) -> question states (B, T, C)
    "[DEC] answer [SEP]"          -> text_decoder (causal BERT LM, cross-attends JTM) -> answer logits

Task protocol (what trainers, evaluators and benchmarks call):
    model.image_size, model.image_mean, model.image_std, model.tokenizer
    model.compute_loss(batch) -> scalar   (answer cross-entropy, label smoothing 0.1, mean over answer tokens)
    model.generate(batch, max_new_tokens=10, num_beams=3) -> list[str]
    model.rank_answers(batch, candidates) -> list[str]
with batch = {"images": uint8 (B, 3, H, W), "questions": [...], "answers": [...], "qids": [...]}.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError, PeftmedError
from ..base import TextLimits
from ..images import prepare_images
from . import generation
from .config import MissConfig
from .layers import BertLMHeadModel, BertModel, VisionTransformer
from .tokenizer import MissTokenizer

log = logging.getLogger("peftmed.backbones.miss")


class MissForVQA(nn.Module):
    def __init__(self, config: MissConfig, tokenizer: MissTokenizer):
        super().__init__()
        check_vocab(tokenizer, config.vocab_size)
        self.config, self.tokenizer = config, tokenizer
        c = config
        self.visual_encoder = VisionTransformer(c.image_size, c.patch_size, c.vision_width, c.vision_layers,
                                                c.vision_heads, c.vision_mlp_ratio)
        self.text_encoder = BertModel(c, kv_width=c.vision_width)  # the JTM
        self.text_decoder = BertLMHeadModel(c, kv_width=c.text_width)
        self.truncated_questions = 0  # questions cut to config.max_question_tokens so far
        self.truncated_answers = 0  # training answers cut to config.max_answer_tokens so far
        self._warned: set[str] = set()
        if self.device.type == "meta":
            return  # shapes only (parameter counts): nothing to initialise
        self.apply(_init_weights)
        for p in (self.visual_encoder.pos_embed, self.visual_encoder.cls_token):
            nn.init.trunc_normal_(p, std=0.02)

    # ---- protocol attributes ------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def image_mean(self) -> tuple[float, ...]:
        return self.config.image_mean

    @property
    def image_std(self) -> tuple[float, ...]:
        return self.config.image_std

    @property
    def device(self) -> torch.device:
        return self.visual_encoder.cls_token.device

    def text_limits(self, prompt: str) -> TextLimits:
        """Decoder input is [DEC] + text (+ [SEP] as a target); generation feeds max_new_tokens positions."""
        return TextLimits(self.config, "max_answer_tokens", 2, self.config.max_position_embeddings - 1,
                          "build it with a larger max_position_embeddings (e.g. --backbone-options "
                          "max_position_embeddings=128)")

    def answer_tokens(self, answer: str) -> int:
        """How many tokens generation must produce to write ``answer`` (its word pieces; [DEC] and [SEP] aside)."""
        return len(self.tokenizer.backend.encode(str(answer)).ids) - 2

    # ---- encoders -----------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        pixels = prepare_images(images.to(self.device), self.image_size, self.image_mean, self.image_std,
                                dtype=self.visual_encoder.cls_token.dtype)
        return self.visual_encoder(pixels)

    def encode(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """JTM states (B, T, C) and mask (B, T) of ``[ENC] question [SEP]`` attending to the image."""
        questions = _texts(batch, "questions")
        image = self.encode_images(batch["images"])  # checks the image shape first
        if len(questions) != image.shape[0]:
            raise PeftmedError(f"batch has {image.shape[0]} images but {len(questions)} questions")
        ids, mask, cut = self.tokenizer.encode(questions, self.config.max_question_tokens, first=self.tokenizer.enc_id)
        if cut:
            self.truncated_questions += cut
            self._warn_once("question", f"{cut} question(s) longer than {self.config.max_question_tokens} tokens "
                                        f"were truncated (model.truncated_questions counts them; reported once)")
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self.text_encoder(ids, mask, image, None), mask

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    # ---- task protocol ------------------------------------------------------------------------------
    def compute_loss(self, batch) -> torch.Tensor:
        """Mean answer cross-entropy over the batch's answer tokens (label smoothing 0.1)."""
        total, count = self.loss_terms(batch)
        return total / max(count, 1)

    def answer_logits(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced decoder logits (B, T, vocab) of ``[DEC] answer``, the targets (B, T; -100 on padding)
        and the target mask (B, T)."""
        answers = _texts(batch, "answers")
        states, mask = self.encode(batch)
        ids, amask, cut = self.tokenizer.encode(answers, self.config.max_answer_tokens, first=self.tokenizer.dec_id)
        if cut:
            self.truncated_answers += cut
            self._warn_once("answer", f"{cut} answer(s) longer than {self.config.max_answer_tokens} tokens were "
                                      f"truncated for training (model.truncated_answers counts them)")
        ids, amask = ids.to(self.device), amask.to(self.device)
        logits = self.text_decoder(ids[:, :-1], amask[:, :-1], states, mask)
        target = ids[:, 1:].masked_fill(~amask[:, 1:], -100)  # predict "answer [SEP]" after [DEC]; skip padding
        return logits, target, amask[:, 1:]

    def loss_terms(self, batch) -> tuple[torch.Tensor, int]:
        """(sum of the answer tokens' cross-entropy, number of answer tokens): what the trainer needs to
        normalise by every token of a global batch, whatever its split into micro-batches and processes."""
        logits, target, tokens = self.answer_logits(batch)
        total = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100,
                                label_smoothing=self.config.label_smoothing, reduction="sum")
        return total, int(tokens.sum())

    def forward(self, batch, return_logits: bool = False) -> torch.Tensor:
        """The training loss (so DDP/FSDP wrappers, which call forward, work); with ``return_logits`` the
        teacher-forced answer logits (B, T, vocab) instead (what the conformance kit compares)."""
        if return_logits:
            return self.answer_logits(batch)[0]
        return self.compute_loss(batch)

    def example_inputs(self, batch: int = 2, seq: int | None = None, generator: torch.Generator | None = None):
        """Keyword arguments of one forward pass returning logits (for the plugin conformance kit)."""
        seed = int(torch.randint(0, 2**31 - 1, (), generator=generator)) if generator is not None else 0
        return {"batch": self.example_batch(batch_size=batch, seed=seed), "return_logits": True}

    @torch.no_grad()
    def generate(self, batch, max_new_tokens: int = 10, num_beams: int = 3) -> list[str]:
        if num_beams < 1 or max_new_tokens < 1:
            raise ConfigError(f"num_beams and max_new_tokens must be >= 1, got {num_beams} and {max_new_tokens}")
        if num_beams > len(self.tokenizer):
            raise ConfigError(f"num_beams={num_beams} exceeds the vocabulary size {len(self.tokenizer)}")
        states, mask = self.encode(batch)
        ids = generation.beam_search(self, states, mask, num_beams=num_beams, max_new_tokens=max_new_tokens)
        return [self.tokenizer.decode(row) for row in ids]

    @torch.no_grad()
    def rank_answers(self, batch, candidates: list[str]) -> list[str]:
        """The candidate with the highest log-probability under the decoder, per sample."""
        candidates = list(candidates)
        if not candidates:
            raise ConfigError("rank_answers needs at least one candidate answer")
        states, mask = self.encode(batch)
        return [candidates[i] for i in generation.rank(self, states, mask, candidates)]

    def example_batch(self, batch_size: int = 2, seed: int = 0, with_answers: bool = True) -> dict:
        """A random batch in the protocol's format (tests, benchmarks)."""
        g = torch.Generator().manual_seed(seed)
        questions = ["is there a pneumothorax in the left lung?", "what organ system is pictured?",
                     "is the heart enlarged?", "where is the mass located?"]
        answers = ["no", "chest", "yes", "left upper lobe"]
        batch = {
            "images": torch.randint(0, 256, (batch_size, 3, self.image_size, self.image_size), generator=g,
                                    dtype=torch.uint8),
            "questions": [questions[i % 4] for i in range(batch_size)],
            "qids": list(range(batch_size)),
        }
        if with_answers:
            batch["answers"] = [answers[i % 4] for i in range(batch_size)]
        return batch


def check_vocab(tokenizer: MissTokenizer, vocab_size: int) -> None:
    """A tokenizer with more ids than embedding rows would index past the table: refuse before training."""
    if len(tokenizer) > vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}; "
            f"use the checkpoint's own vocabulary (vocab.txt / tokenizer.json) or build with vocab_size>={len(tokenizer)}"
        )


def _texts(batch, key: str) -> list[str]:
    if key not in batch:
        raise PeftmedError(f"batch has no {key!r}; it has {sorted(batch)}")
    texts = batch[key]
    if isinstance(texts, str):
        raise PeftmedError(f"batch[{key!r}] must be a list of strings, got a single string {texts!r}")
    return [str(t) for t in texts]


def _init_weights(module: nn.Module) -> None:
    # BERT's / BLIP's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm gains
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
