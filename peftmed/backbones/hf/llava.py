"""``hf-llava``: transformers' ``LlavaForConditionalGeneration`` (LLaVA-Med's architecture) behind
peftmed's VQA task protocol.

Components: ``vision`` = the CLIP vision tower, ``projector`` = the multi-modal projector, ``llm`` =
the language model's decoder stack plus its LM head (``model.lm_head`` sits beside the language model
in transformers 5's layout, so the component spans both paths; ``llm=full`` trains the head too, and
the ``head`` role names it).

A sample is ``<s> USER: <image x N>\\n{question} ASSISTANT: {answer}</s>`` (the template is an option):
the image placeholder is expanded to one token per image feature, the loss covers the answer tokens
only, and generation continues the prompt (left-padded) until ``</s>``.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from ...errors import ConfigError
from ..base import Backbone, TextLimits
from .common import (
    CLIP_MEAN, CLIP_STD, VQAModule, load_state_strict, load_tokenizer, load_weights, local_folder, read_image_stats,
    preset_spec, saved_tokenizer, seeded_model, unused_tower_modules,
)
from .prefix import make_prefix_capable
from .tokenizer import bpe_tokenizer, check_vocab

DEFAULT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
IMAGE_PLACEHOLDER = "<image>"

PRESETS: dict[str, dict] = {
    "tiny": {
        "vision": dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32),
        "text": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
        "vocab_size": 500,  # target size of the trained BPE vocabulary
    },
    # LLaVA-Med v1.5 (microsoft/llava-med-v1.5-mistral-7b): CLIP ViT-L/14 at 336 px, Mistral-7B-Instruct-v0.2,
    # a 2-layer MLP projector (mlp2x_gelu); vocabulary 32000 + <image> + <pad>, padded to 32064 as llava-hf does
    "llava-med-7b": {
        "vision": dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        "text": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                     rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None, vocab_size=32064),
        "projector": "mlp",
    },
    # LLaVA v1 / LLaVA-Med v1 style: CLIP ViT-L/14 at 224 px, LLaMA-7B, one linear projector
    "llava-v1-7b": {
        "vision": dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768),
        "text": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                     rms_norm_eps=1e-6, vocab_size=32064),
        "projector": "linear",
    },
}
PROJECTORS = ("mlp", "linear")


class LinearProjector(nn.Module):
    """LLaVA v1's projector: one linear map from the vision features to the LLM's width (``linear_1``, so the
    ``mlp.up`` role and converted checkpoints name it as transformers names the MLP projector's first layer)."""

    def __init__(self, config):
        super().__init__()
        layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        self.linear_1 = nn.Linear(config.vision_config.hidden_size * layers, config.text_config.hidden_size,
                                  bias=getattr(config, "multimodal_projector_bias", True))

    def forward(self, image_features):
        return self.linear_1(image_features)


def projector_of(config) -> str:
    kind = getattr(config, "peftmed_projector", "mlp") or "mlp"
    if kind not in PROJECTORS:
        raise ConfigError(f"hf-llava: config.peftmed_projector is {kind!r}; expected one of {PROJECTORS}")
    return kind


def llava_model(config, seed: int | None = 0):
    """``LlavaForConditionalGeneration(config)``, with LLaVA v1's single linear projector when the config
    says ``peftmed_projector="linear"``."""
    from transformers import LlavaForConditionalGeneration

    def build(config):
        model = LlavaForConditionalGeneration(config)
        if projector_of(config) == "linear":  # drawn from the same seed as the rest of the model
            with torch.device(model.model.multi_modal_projector.linear_1.weight.device):
                model.model.multi_modal_projector = LinearProjector(config)
        return model

    return seeded_model(build, config, seed)


class HFLlava(VQAModule):
    """LlavaForConditionalGeneration (at ``.model``) with a tokenizer, a prompt template and the VQA protocol.

    ``max_question_tokens`` counts the question's own tokens (the template and image tokens come on
    top); answers are cut to ``max_answer_tokens`` tokens for the loss.
    """

    processor_type = "CLIPImageProcessor"

    def __init__(self, model, tokenizer, *, image_size: int | None = None, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                 template: str = DEFAULT_TEMPLATE, max_question_tokens: int = 64, max_answer_tokens: int = 16):
        cfg = model.config
        vocab = cfg.text_config.vocab_size
        check_vocab(tokenizer, vocab, "hf-llava")
        if not hasattr(model, "model") or not hasattr(model.model, "vision_tower"):
            raise ConfigError("hf-llava needs transformers >= 5 (LlavaForConditionalGeneration.model.vision_tower)")
        super().__init__(model, tokenizer, image_size or cfg.vision_config.image_size, image_mean, image_std,
                         max_question_tokens)
        if template.count(IMAGE_PLACEHOLDER) != 1 or "{question}" not in template:
            raise ConfigError(f"hf-llava: the prompt template must contain {IMAGE_PLACEHOLDER!r} once and "
                              f"'{{question}}', got {template!r}")
        self.template, self.max_answer_tokens = template, int(max_answer_tokens)
        self.image_token_id = getattr(cfg, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = cfg.image_token_index
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        special = (("image token", self.image_token_id), ("eos token", self.eos_id), ("pad token", self.pad_id))
        for label, tid in special:
            if tid is None or not 0 <= tid < vocab:
                raise ConfigError(f"hf-llava: the {label} id {tid} is not a token id below vocab_size={vocab}")
        patches = (self.image_size // cfg.vision_config.patch_size) ** 2
        self.num_image_tokens = patches + (1 if cfg.vision_feature_select_strategy == "full" else 0)

    def text_limits(self, prompt: str) -> TextLimits:
        positions = self.model.config.text_config.max_position_embeddings
        prompt_len = len(self._prompt(prompt)[0])  # the template, image tokens and the prompt come first
        return TextLimits(self, "max_answer_tokens", 0, positions - prompt_len - 1,
                          "use a language model with more positions or a shorter prompt")

    def answer_tokens(self, answer: str) -> int:
        """How many tokens generation must produce to write ``answer`` (as the loss writes it: after a space)."""
        return len(self._ids(" " + str(answer).strip()))

    # ---- prompts --------------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _prompt(self, question: str) -> tuple[list[int], int]:
        """Token ids of the prompt for one question, and the question's untruncated length."""
        before, after = self.template.split(IMAGE_PLACEHOLDER)
        head, tail = after.split("{question}", 1)
        q = self._ids(question)
        ids = [self.bos_id] if self.bos_id is not None else []
        ids += self._ids(before) + [self.image_token_id] * self.num_image_tokens
        ids += self._ids(head) + q[: self.max_question_tokens] + self._ids(tail)
        return ids, len(q)

    def _prompts(self, questions) -> list[list[int]]:
        prompts = [self._prompt(q) for q in questions]
        self._count_truncated([n for _, n in prompts], self.max_question_tokens)
        return [p for p, _ in prompts]

    def _check(self, batch) -> None:
        if len(batch["questions"]) != batch["images"].shape[0]:
            raise ConfigError(f"batch has {batch['images'].shape[0]} images but {len(batch['questions'])} questions")

    def _pad(self, seqs: list[list[int]], left: bool, fill: int) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        out = torch.full((len(seqs), width), fill, dtype=torch.long)
        for i, s in enumerate(seqs):
            if left:
                out[i, width - len(s):] = torch.tensor(s)
            else:
                out[i, : len(s)] = torch.tensor(s)
        return out.to(self.device)

    # ---- task protocol ------------------------------------------------------------------------------
    def compute_loss(self, batch) -> torch.Tensor:
        """Cross-entropy of the answer tokens (and ``</s>``) given the image and the prompt."""
        return self(batch)["loss"]

    def loss_terms(self, batch) -> tuple[torch.Tensor, int]:
        """(sum of the answer tokens' cross-entropy, number of answer tokens), for token-normalised training."""
        out = self._decode(batch, with_loss=False)
        logits, labels = out["logits"][:, :-1].float(), out["labels"][:, 1:]
        total = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                  reduction="sum")
        return total, int((labels != -100).sum())

    def forward(self, batch) -> dict[str, torch.Tensor]:
        """``{"loss": scalar, "logits": (B, T, vocab)}`` over prompt + answer (loss on the answer only)."""
        out = self._decode(batch, with_loss=True)
        return {"loss": out["loss"], "logits": out["logits"]}

    def _decode(self, batch, with_loss: bool) -> dict:
        self._check(batch)
        if len(batch.get("answers") or ()) != len(batch["questions"]):
            raise ConfigError("compute_loss needs one answer per question in batch['answers']")
        prompts = self._prompts(batch["questions"])
        answers = [self._ids(" " + str(a).strip())[: self.max_answer_tokens] + [self.eos_id] for a in batch["answers"]]
        seqs = [p + a for p, a in zip(prompts, answers)]
        targets = [[-100] * len(p) + a for p, a in zip(prompts, answers)]
        ids = self._pad(seqs, left=False, fill=self.pad_id)
        labels = self._pad(targets, left=False, fill=-100)
        mask = self._pad([[1] * len(s) for s in seqs], left=False, fill=0)
        # no key/value cache while training: nothing reuses it, and a checkpointed layer recomputing its
        # forward would append to it a second time
        out = self.model(input_ids=ids, attention_mask=mask, pixel_values=self.pixel_values(batch["images"]),
                         labels=labels if with_loss else None, use_cache=False)
        return {"loss": out.loss, "logits": out.logits, "labels": labels}

    @torch.no_grad()
    def generate(self, batch, max_new_tokens: int = 10, num_beams: int = 3) -> list[str]:
        """Answers continuing the prompt by beam search (``num_beams=1``: greedy) until ``</s>``."""
        self._check(batch)
        prompts = self._prompts(batch["questions"])
        ids = self._pad(prompts, left=True, fill=self.pad_id)
        mask = self._pad([[1] * len(p) for p in prompts], left=True, fill=0)
        was_training = self.training
        self.eval()
        try:
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, pixel_values=self.pixel_values(batch["images"]),
                max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                eos_token_id=self.eos_id, pad_token_id=self.pad_id,
            )
        finally:
            self.train(was_training)
        return [t.strip() for t in self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]


def llava_config(preset: str = "tiny", vocab_size: int = 500, image_size: int | None = None, *, image_token_id: int,
                 pad_token_id: int, bos_token_id: int, eos_token_id: int, vision_layers: int | None = None,
                 text_layers: int | None = None, width_divisor: int | None = None):
    from transformers import LlavaConfig

    spec = preset_spec(PRESETS, preset, "hf-llava", image_size, vision_layers, text_layers, width_divisor)
    text = dict(spec["text"], pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    text.setdefault("vocab_size", vocab_size)  # a real architecture's vocabulary is fixed; a tiny one fits its tokenizer
    # vision_feature_layer=-2 and dropping the CLS feature are LLaVA(-Med)'s choices
    return LlavaConfig(vision_config=spec["vision"], text_config=text, image_token_index=image_token_id,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       peftmed_projector=spec.get("projector", "mlp"))


def build(preset: str = "tiny", config=None, tokenizer=None, texts=None, image_size: int | None = None,
          template: str = DEFAULT_TEMPLATE, max_question_tokens: int = 64, max_answer_tokens: int = 16,
          seed: int | None = 0, vision_layers: int | None = None, text_layers: int | None = None,
          width_divisor: int | None = None) -> HFLlava:
    """A fresh (randomly initialised) LLaVA with a tokenizer; nothing is downloaded.

    ``preset``: ``tiny`` (CPU tests), ``llava-med-7b`` (LLaVA-Med v1.5: CLIP ViT-L/14-336 + Mistral-7B, MLP
    projector), ``llava-v1-7b`` (CLIP ViT-L/14-224 + LLaMA-7B, linear projector); build the 7B presets under
    ``torch.device("meta")`` to count or plan without memory. ``config``: a ``LlavaConfig`` (overrides
    ``preset``); ``tokenizer``: any fast tokenizer that fits it; otherwise a byte-level BPE tokenizer is
    trained on the built-in corpus plus ``texts`` and the template (and a tiny preset's vocabulary is sized
    to it exactly).
    """
    if tokenizer is None:
        corpus = [template.replace(IMAGE_PLACEHOLDER, " ").replace("{question}", " ")] + list(texts or ())
        tokenizer = bpe_tokenizer(corpus, vocab_size=PRESETS.get(preset, PRESETS["tiny"]).get("vocab_size", 500))
    if config is None:
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        if image_id is None or image_id == tokenizer.unk_token_id:
            raise ConfigError(f"hf-llava: the tokenizer has no {IMAGE_PLACEHOLDER!r} token; add it as a special token")
        config = llava_config(preset, len(tokenizer), image_size, image_token_id=image_id,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, vision_layers=vision_layers, text_layers=text_layers,
                              width_divisor=width_divisor)
    elif image_size is not None and image_size != config.vision_config.image_size:
        raise ConfigError(f"hf-llava: image_size={image_size} disagrees with the config's "
                          f"vision_config.image_size={config.vision_config.image_size}")
    model = llava_model(config, seed)
    return HFLlava(model, tokenizer, template=template, max_question_tokens=max_question_tokens,
                   max_answer_tokens=max_answer_tokens)


def load(path: str | os.PathLike, template: str = DEFAULT_TEMPLATE, max_question_tokens: int = 64,
         max_answer_tokens: int = 16, strict: bool = True) -> HFLlava:
    """Load a local LLaVA folder (``save_pretrained`` output, a llava-hf-format checkpoint, or what
    ``peftmed convert llava-med`` wrote)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    folder = local_folder(path, "hf-llava")
    tokenizer = load_tokenizer(folder, "hf-llava")
    config = LlavaConfig.from_pretrained(str(folder), local_files_only=True)
    if projector_of(config) == "linear":  # transformers has no single-linear projector: build it, then fill it
        model = load_state_strict(llava_model(config, seed=None), folder, "hf-llava", strict)
    else:
        model = load_weights(LlavaForConditionalGeneration, folder, "hf-llava", strict)
    size, mean, std = read_image_stats(folder, model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD)
    return HFLlava(model, tokenizer, image_size=size, image_mean=mean, image_std=std, template=template,
                   max_question_tokens=max_question_tokens, max_answer_tokens=max_answer_tokens)


# CLIP vision tower and Llama-style LM share the q/k/v_proj naming; out_proj vs o_proj, fc vs gated MLP.
ROLES = {
    "attn.q": r"self_attn\.q_proj$", "attn.k": r"self_attn\.k_proj$", "attn.v": r"self_attn\.v_proj$",
    "attn.o": r"self_attn\.(o_proj|out_proj)$",
    "mlp.up": r"mlp\.(fc1|gate_proj|up_proj)$", "mlp.down": r"mlp\.(fc2|down_proj)$",
    "embed": r"(^|\.)(embeddings|embed_tokens)$",
    "patch": r"embeddings\.patch_embedding$",
    "head": r"^lm_head$",
    "self_attention": r"self_attn$",
}

def unused(model) -> list[str]:
    """LLaVA takes its image features from ``hidden_states[vision_feature_layer]`` (-2: the second-to-last
    layer): the layers after it and the tower's post_layernorm (applied to the pooled output only) feed
    nothing."""
    root = "model.model.vision_tower"
    return unused_tower_modules(root, model.get_submodule(root), model.model.config.vision_feature_layer,
                                final_norm="post_layernorm")


BACKBONE = Backbone(
    name="hf-llava",
    components={"vision": "model.model.vision_tower", "projector": "model.model.multi_modal_projector",
                "llm": ("model.model.language_model", "model.lm_head")},
    roles=ROLES,
    component_roles={"projector": {"mlp.up": r"linear_1$", "mlp.down": r"linear_2$"}},
    builder=build,
    loader=load,
    prefix_wrapper=make_prefix_capable,
    tokenizer_loader=saved_tokenizer,
    description="transformers LlavaForConditionalGeneration, LLaVA-Med's architecture (vision | projector | llm)",
    tasks=("vqa", "report"),
    depth_options={"vision_layers": ("vision",), "text_layers": ("llm",)},
    width_option="width_divisor",
    unused=unused,
    tiny=True,  # the default build is the tiny preset (the conformance kit runs on it)
)

# The real architectures by name (the same builder, loader and role map; weights come from a converted
# checkpoint with --pretrained, or are random: build them under torch.device("meta") to count or plan)
PRESET_BACKBONES = (
    dataclasses.replace(BACKBONE, name="llava-med-7b", defaults={"preset": "llava-med-7b"}, tiny=False,
                        description="LLaVA-Med v1.5: CLIP ViT-L/14-336 + Mistral-7B + MLP projector (7.57B params)"),
    dataclasses.replace(BACKBONE, name="llava-v1-7b", defaults={"preset": "llava-v1-7b"}, tiny=False,
                        description="LLaVA v1 style: CLIP ViT-L/14-224 + LLaMA-7B + linear projector (7.05B params)"),
)
