"""Any image-text-to-text model transformers builds, behind peftmed's VQA task protocol: one generic backbone.

The components are found in the module structure, not written per model. transformers 5 lays every such model
out as ``XForConditionalGeneration(model=XModel(<vision>, <projector>, <language model>), lm_head)``:

- ``vision``: the inner model's ``visual`` / ``vision_tower`` / ``vision_model``;
- ``projector``: its ``multi_modal_projector`` / ``connector``, or, where the projector sits inside the tower
  (Qwen2/2.5/3-VL's ``merger`` and DeepStack mergers), those modules, the tower then being its other children;
- ``llm``: ``language_model`` / ``text_model`` plus ``lm_head``; where some decoder layers are cross-attention
  layers (Mllama), those layers are the ``fusion`` component and ``llm`` the others.

Roles come from the common module names (``q_proj``, ``qkv``, ``o_proj`` / ``out_proj`` / ``proj``, ``fc1`` /
``gate_proj`` / ``up_proj``...). What structure cannot say is data in :mod:`.families` (tokens, processor
settings, prompt format). A family transformers adds later with the same layout works through
:func:`backbone_for`; one without it is refused with what was found.

Inputs go through the family's own processor (Qwen's dynamic resolution and ``image_grid_thw``, Gemma 3's image
tokens, InternVL's ``<img>`` context, Mllama's cross-attention mask...) and chat template: the prompt is the
processor's output for the question and image, the answer's tokens (and the family's end-of-turn token) follow
it, and the loss covers those only. Generation is the model's own ``generate``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import inspect
import json
import os
from collections.abc import Mapping

import torch
from torch import nn

from ...errors import ConfigError, PeftmedError
from ..base import Backbone, TextLimits
from .common import VQAModule, load_tokenizer, load_weights, local_folder, narrower, saved_tokenizer, seeded_model
from .families import FAMILIES, LLM_NAMES, MERGER_NAMES, PROJECTOR_NAMES, VISION_NAMES, chat_template
from .prefix import make_prefix_capable

PROCESSOR_FILE = "processor_config.json"  # the processor's own settings (image_seq_length...), as Hub folders have

ROLES = {
    "attn.q": r"(self_attn|attention)\.q_proj$", "attn.k": r"(self_attn|attention)\.k_proj$",
    "attn.v": r"(self_attn|attention)\.v_proj$", "attn.qkv": r"attn\.qkv$",
    "attn.o": r"(self_attn\.(o_proj|out_proj)|attn\.proj|attention\.projection_layer)$",
    "cross.q": r"cross_attn\.q_proj$", "cross.k": r"cross_attn\.k_proj$", "cross.v": r"cross_attn\.v_proj$",
    "cross.o": r"cross_attn\.o_proj$",
    "mlp.up": r"mlp\.(fc1|gate_proj|up_proj|linear_fc1)$", "mlp.down": r"mlp\.(fc2|down_proj|linear_fc2)$",
    "patch": r"(patch_embed\.proj|^proj|patch_embedding|patch_embeddings\.projection)$",
    "head": r"^lm_head$",
    "self_attention": r"(^|\.)(self_attn|attention|attn)$",
    "cross_attention": r"cross_attn$",
}
def _linear_projector(name: str, module: nn.Module) -> bool:
    """A projector that is itself one linear layer (Mllama's)."""
    return name == "multi_modal_projector" and isinstance(module, nn.Linear)


PROJECTOR_ROLES = {
    "mlp.up": (r"(linear_1|linear_fc1|mlp\.0|modality_projection\.proj|^linear)$", _linear_projector),
    "mlp.down": r"(linear_2|linear_fc2|mlp\.2)$",
}


# ---- finding the components ------------------------------------------------------------------------
def _first(parent: nn.Module, names) -> str | None:
    return next((n for n in names if isinstance(getattr(parent, n, None), nn.Module)), None)


def discover(model: nn.Module, root: str = "model") -> dict[str, str | tuple[str, ...]]:
    """component -> module path(s) of a transformers image-text-to-text model (``root``: where the wrapper holds
    it); a model without a recognisable vision tower or language model is refused with what was found."""
    inner = getattr(model, "model", None)
    found = [n for n, _ in (inner or model).named_children()]
    what = f"{type(model).__name__} (children of its inner model: {', '.join(found) or 'none'})"
    if inner is None or not isinstance(getattr(model, "lm_head", None), nn.Module):
        raise ConfigError(f"{what}: expected an image-text-to-text model with .model (vision, projector, language "
                          f"model) and .lm_head, as transformers lays them out")
    vision, llm = _first(inner, VISION_NAMES), _first(inner, LLM_NAMES)
    if vision is None or llm is None:
        missing = "a vision tower (" + "/".join(VISION_NAMES) + ")" if vision is None else \
            "a language model (" + "/".join(LLM_NAMES) + ")"
        raise ConfigError(f"{what} has no {missing}: not a vision-language model peftmed can take apart")
    pre = f"{root}.model." if root else "model."
    head = f"{root}.lm_head" if root else "lm_head"
    tower = getattr(inner, vision)
    out: dict[str, str | tuple[str, ...]] = {}
    projector = _first(inner, PROJECTOR_NAMES)
    mergers = [n for n in MERGER_NAMES if isinstance(getattr(tower, n, None), nn.Module)]
    if projector is not None:
        out["vision"], out["projector"] = pre + vision, pre + projector
    elif mergers:
        out["vision"] = tuple(f"{pre}{vision}.{n}" for n, c in tower.named_children()
                              if n not in mergers and any(True for _ in c.parameters()))
        out["projector"] = tuple(f"{pre}{vision}.{n}" for n in mergers)
    else:
        raise ConfigError(f"{what}: no projector between the vision tower and the language model "
                          f"(looked for {', '.join(PROJECTOR_NAMES + MERGER_NAMES)})")
    lm = getattr(inner, llm)
    layers = getattr(lm, "layers", None)
    cross = [i for i, layer in enumerate(layers or ()) if "CrossAttention" in type(layer).__name__]
    if cross:
        out["fusion"] = tuple(f"{pre}{llm}.layers.{i}" for i in cross)
        rest = [f"{pre}{llm}.{n}" for n, c in lm.named_children() if n != "layers" and any(True for _ in c.parameters())]
        out["llm"] = (*rest, *(f"{pre}{llm}.layers.{i}" for i in range(len(layers)) if i not in cross), head)
    else:
        out["llm"] = (pre + llm, head)
    return out


def unused_modules(model: nn.Module, root: str = "model") -> list[str]:
    """Modules whose outputs never reach the loss: a SigLIP tower's pooling head (the VLMs take the patch
    features), and the tower's layers after the one the features are taken from."""
    hf = model.get_submodule(root) if root else model
    inner, pre = hf.model, f"{root}.model." if root else "model."
    vision = _first(inner, VISION_NAMES)
    tower = getattr(inner, vision)
    out = []
    body = getattr(tower, "vision_model", tower)  # SiglipVisionModel / CLIPVisionModel wrap a transformer
    body_path = pre + vision + (".vision_model" if body is not tower else "")
    if isinstance(getattr(body, "head", None), nn.Module):
        out.append(body_path + ".head")
    layer = getattr(hf.config, "vision_feature_layer", None)
    encoder = getattr(body, "encoder", None)
    stack = getattr(encoder, "layers", None) or getattr(encoder, "layer", None)
    if isinstance(layer, int):  # features from hidden_states[layer]: the final norm is applied after them
        if isinstance(getattr(body, "post_layernorm", None), nn.Module):
            out.append(body_path + ".post_layernorm")
        if stack is not None and layer < -1:
            name = "layers" if getattr(encoder, "layers", None) is not None else "layer"
            n = len(stack)
            out += [f"{body_path}.encoder.{name}.{i}" for i in range(n + layer + 1, n)]
    return out


class LazyComponents(Mapping):
    """A family's components, found on first use in a tiny model of it built on the meta device."""

    def __init__(self, family: str):
        self.family, self._paths = family, None
        cross = "cross_attention_layers" in _family(family)["tiny"]["text"]
        self._names = ("vision", "projector", "llm") + (("fusion",) if cross else ())

    def _load(self) -> dict:
        if self._paths is None:
            with torch.device("meta"):
                model = family_model(family_config(self.family, "tiny", vocab_size=64, token_ids=None), seed=None)
            self._paths = discover(model)
        return self._paths

    def __getitem__(self, key):
        if key not in self._names:
            raise KeyError(key)
        return self._load()[key]

    def __contains__(self, key):
        return key in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


def backbone_for(model: nn.Module, name: str | None = None) -> Backbone:
    """A Backbone for any transformers image-text-to-text model instance (a family peftmed has no data for):
    ``peftmed.apply(model, recipe, backbone=backbone_for(model))``. ``model`` is the transformers model itself."""
    return Backbone(name=name or type(model).__name__, components=discover(model, root=""), roles=ROLES,
                    component_roles={"projector": PROJECTOR_ROLES}, prefix_wrapper=make_prefix_capable,
                    unused=lambda m: unused_modules(m, root=""))


# ---- configurations, models, tokenizers, processors -------------------------------------------------
def _family(name: str) -> dict:
    if name not in FAMILIES:
        raise ConfigError(f"unknown vision-language family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def _spec(family: str, preset: str) -> dict:
    fam = _family(family)
    if preset == "tiny":
        return copy.deepcopy(fam["tiny"])
    if preset not in fam["presets"]:
        raise ConfigError(f"{family}: unknown preset {preset!r}; expected 'tiny' or one of {sorted(fam['presets'])}")
    return copy.deepcopy(fam["presets"][preset])


EXTRA_WIDTHS = ("embed_dim", "out_hidden_size", "vision_output_dim")  # widths besides common.WIDTH_KEYS


def _narrower(part: dict, divisor: int, what: str, head_multiple: int = 2) -> dict:
    """``common.narrower`` plus the widths VLM towers name otherwise, and multimodal rotary sections scaled with
    the head width."""
    out = narrower(part, divisor, what)
    for key in EXTRA_WIDTHS:
        if out.get(key):
            if out[key] % divisor:
                raise ConfigError(f"{what}: {key}={out[key]} is not divisible by width_divisor={divisor}")
            out[key] //= divisor
    # the family's data may ask a head width to stay a multiple of more than 2 (Qwen's 2-D vision rotary: half
    # the head per image axis, each half in cos/sin pairs): a narrow copy that breaks it would not run
    width = _head_width(out)
    if width and width % head_multiple:
        raise ConfigError(f"{what}: width_divisor={divisor} leaves heads {width} wide, and this family's heads must "
                          f"stay a multiple of {head_multiple}: choose a smaller divisor")
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "mrope_section" in rope:
        if any(s % divisor for s in rope["mrope_section"]):
            raise ConfigError(f"{what}: mrope_section {rope['mrope_section']} is not divisible by {divisor}")
        out["rope_parameters"] = dict(rope, mrope_section=[s // divisor for s in rope["mrope_section"]])
    return out


def _head_width(part: dict) -> int | None:
    if part.get("head_dim"):
        return int(part["head_dim"])
    width = part.get("embed_dim") or part.get("hidden_size")  # Qwen2-VL's tower: embed_dim (hidden_size: the LLM's)
    heads = part.get("num_attention_heads") or part.get("num_heads")
    return width // heads if width and heads and width % heads == 0 else None


def family_config(family: str, preset: str = "tiny", *, vocab_size: int, token_ids: dict | None,
                  text_layers: int | None = None, vision_layers: int | None = None, width_divisor: int | None = None):
    """The transformers config of a family's preset; ``token_ids``: config field -> id (None: placeholders);
    ``width_divisor``: every width divided (the heads kept), for ``peftmed plan``'s narrow copies."""
    from transformers import AutoConfig

    fam, spec = _family(family), _spec(family, preset)
    if width_divisor not in (None, 1):
        multiple = fam.get("head_multiple", {})
        spec["text"] = _narrower(spec["text"], width_divisor, f"{family} text", multiple.get("text", 2))
        spec["vision"] = _narrower(spec["vision"], width_divisor, f"{family} vision", multiple.get("vision", 2))
    text = dict(spec["text"])
    text.setdefault("vocab_size", vocab_size)
    if text_layers is not None:
        text["num_hidden_layers"] = _positive(text_layers, "text_layers")
        if "cross_attention_layers" in text:
            text["cross_attention_layers"] = [i for i in text["cross_attention_layers"] if i < text_layers] or [0]
    vision = dict(spec["vision"])
    if vision_layers is not None:
        key = "depth" if "depth" in vision else "num_hidden_layers"
        vision[key] = _positive(vision_layers, "vision_layers")
        for k in ("fullatt_block_indexes", "deepstack_visual_indexes", "intermediate_layers_indices"):
            if k in vision:
                vision[k] = [i for i in vision[k] if i < vision_layers] or [vision_layers - 1]
    ids = token_ids if token_ids is not None else {
        **{k: i for i, k in enumerate(fam["ids"], start=3)}, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    text.update({k: v for k, v in ids.items() if k in ("pad_token_id", "bos_token_id", "eos_token_id")})
    top = {k: v for k, v in ids.items() if k not in ("pad_token_id", "bos_token_id", "eos_token_id")}
    return AutoConfig.for_model(fam["model_type"], text_config=text, vision_config=vision, **spec.get("top", {}), **top)


def _positive(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def model_class(model_type: str):
    """transformers' image-text-to-text class for ``model_type`` (from transformers' own table)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as NAMES

    if model_type not in NAMES:
        raise ConfigError(f"transformers {transformers.__version__} has no image-text-to-text model for "
                          f"model_type {model_type!r}")
    return getattr(transformers, NAMES[model_type])


def family_model(config, seed: int | None = 0):
    return seeded_model(model_class(config.model_type), config, seed)


def family_tokenizer(family: str, texts=None, vocab_size: int = 400):
    """A byte-level BPE tokenizer with the family's special tokens (as tokenizer attributes: ``image_token``...)."""
    from .tokenizer import bpe_tokenizer  # deferred: the tokenizer module imports the tokenizers package

    tokens = _family(family)["tokens"]
    return bpe_tokenizer(texts, vocab_size=vocab_size, extra={k: v for k, v in tokens.items()})


def _check_requirements(family: str) -> None:
    missing = [p for p in _family(family).get("requires", ()) if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(f"{family}: transformers' processor for this family needs {', '.join(missing)}, which is "
                          f"not installed (pip install {' '.join(missing)})")


def _processor_class(model_type: str):
    """The family's processor class, accepting no video processor (that needs torchvision, which a VQA run does
    not use): transformers checks every processor part's class, and its video processor class is a stand-in
    without torchvision."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    base = getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])

    def check(self, name, arg):
        return None if arg is None else base.check_argument_for_proper_class(self, name, arg)

    return type(base.__name__, (base,), {"check_argument_for_proper_class": check, "__module__": base.__module__})


def _image_processor(family: str, folder=None, settings: dict | None = None):
    import transformers

    cls_name, kwargs, attrs = _family(family)["image_processor"]
    cls = getattr(transformers, cls_name)
    if settings is not None:  # a real architecture's
        kwargs, attrs = settings, {}
    if folder is not None:
        proc = cls.from_pretrained(str(folder), local_files_only=True)
    else:
        proc = cls(**kwargs)
    for k, v in attrs.items():
        if folder is None or getattr(proc, k, None) is None:
            setattr(proc, k, v)
    return proc


def family_processor(family: str, tokenizer, image_processor=None, chat: str | None = None,
                     settings: dict | None = None):
    """The family's processor around ``tokenizer`` (the tiny model's image-processor and processor settings unless
    given; ``settings``: processor settings read from a folder, only the keys the family's data names)."""
    _check_requirements(family)
    fam = _family(family)
    if chat is None and fam["chat"] is not None:
        chat = chat_template(*fam["chat"])
    kwargs = dict(fam["processor"])
    if settings is not None:
        kwargs = {k: v for k, v in kwargs.items() if k == "video_processor"}
        kwargs.update({k: v for k, v in settings.items() if k in fam["processor"] and k != "video_processor"})
    try:
        return _processor_class(fam["model_type"])(image_processor=image_processor or _image_processor(family),
                                                   tokenizer=tokenizer, chat_template=chat, **kwargs)
    except ImportError as exc:
        raise ConfigError(f"{family}: cannot build transformers' processor: {exc}") from exc


# ---- the VQA module --------------------------------------------------------------------------------
class HFVisionLanguage(VQAModule):
    """A transformers image-text-to-text model (at ``.model``) with its processor and the VQA protocol.

    ``max_question_tokens`` counts the question's own tokens; answers are cut to ``max_answer_tokens`` tokens.
    """

    def __init__(self, model, processor, family: str, *, image_size: int, max_question_tokens: int = 64,
                 max_answer_tokens: int = 16):
        fam = _family(family)
        if model.config.model_type != fam["model_type"]:
            raise ConfigError(f"{family}: the model is a {model.config.model_type!r} model, not {fam['model_type']!r}")
        discover(model, root="")  # refuses a model it cannot take apart
        tokenizer = processor.tokenizer
        vocab = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab:
            raise ConfigError(f"{family}: the tokenizer has {len(tokenizer)} tokens but the model's embedding table "
                              f"{vocab}; use the tokenizer the checkpoint was trained with")
        super().__init__(model, tokenizer, image_size, (0.5,) * 3, (0.5,) * 3, max_question_tokens)
        self.processor, self.family = processor, family
        self.peftmed_backbone = family  # peftmed.apply(model, recipe) needs no backbone= (presets retag it)
        self.max_answer_tokens = int(max_answer_tokens)
        self.answer_prefix = fam.get("answer_prefix", "")
        self.answer_values = dict(fam.get("answer_values", {}))
        end = fam["tokens"].get("end")
        end_id = tokenizer.convert_tokens_to_ids(end) if end else None
        if end_id is None or end_id == tokenizer.unk_token_id:
            end_id = tokenizer.eos_token_id
        if end_id is None:
            raise ConfigError(f"{family}: the tokenizer has neither {end!r} nor an eos token to end an answer with")
        self.end_id = end_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
        self.stop_ids = sorted({end_id, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})

    # ---- prompts --------------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _prompt_text(self, question: str) -> str:
        q = self._ids(question)
        if len(q) > self.max_question_tokens:
            question = self.tokenizer.decode(q[: self.max_question_tokens])
        fam = _family(self.family)
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return fam.get("prompt", "{question}").format(question=question)

    def _images(self, images: torch.Tensor) -> list:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ConfigError(f"{self.family}: images must be uint8 (B, 3, H, W), got {images.dtype} "
                              f"{tuple(images.shape)}")
        images = images.cpu()
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return [[img] for img in images]

    def _encode(self, batch, answers: list[list[int]] | None, left: bool) -> dict:
        """The processor's inputs for the batch's questions and images, with ``answers`` (token ids) appended to
        each prompt; ``labels`` cover the answers only."""
        questions = batch["questions"]
        if len(questions) != batch["images"].shape[0]:
            raise ConfigError(f"batch has {batch['images'].shape[0]} images but {len(questions)} questions")
        self._count_truncated([len(self._ids(q)) for q in questions], self.max_question_tokens)
        texts = [self._prompt_text(q) for q in questions]
        enc = self.processor(images=self._images(batch["images"]), text=texts, return_tensors="pt", padding=True)
        enc.pop("labels", None)  # PaliGemma's processor labels the whole prompt when no suffix is given
        ids, mask = enc.pop("input_ids"), enc.pop("attention_mask")
        width = ids.shape[1]
        per_token = {k: v for k, v in enc.items() if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == ids.shape}
        rows = []
        for i in range(ids.shape[0]):
            keep = mask[i].bool()
            answer = answers[i] if answers is not None else []
            row = {"input_ids": ids[i][keep].tolist() + answer, "labels": [-100] * int(keep.sum()) + answer}
            for k, v in per_token.items():
                own = v[i][keep]
                if k == "cross_attention_mask":  # answer tokens see the image as the prompt's last token does
                    extra = own[-1:].expand(len(answer), *own.shape[1:])
                else:
                    extra = torch.full((len(answer), *own.shape[1:]), self.answer_values.get(k, 0), dtype=own.dtype)
                row[k] = torch.cat([own, extra])
            rows.append(row)
        width = max(len(r["input_ids"]) for r in rows)
        out = {k: v for k, v in enc.items() if k not in per_token}
        pad = {"input_ids": self.pad_id, "labels": -100}
        for key in ["input_ids", "labels", *per_token]:
            cols = []
            for r in rows:
                value = r[key] if torch.is_tensor(r[key]) else torch.tensor(r[key], dtype=torch.long)
                fill = torch.full((width - len(value), *value.shape[1:]), pad.get(key, 0), dtype=value.dtype)
                cols.append(torch.cat([fill, value] if left else [value, fill]))
            out[key] = torch.stack(cols)
        lengths = [len(r["input_ids"]) for r in rows]
        out["attention_mask"] = torch.stack([
            torch.cat([torch.zeros(width - n, dtype=torch.long), torch.ones(n, dtype=torch.long)]) if left else
            torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(width - n, dtype=torch.long)]) for n in lengths])
        dtype = self.dtype
        return {k: (v.to(self.device, dtype) if torch.is_tensor(v) and v.is_floating_point() else
                    v.to(self.device) if torch.is_tensor(v) else v) for k, v in out.items()}

    def _answers(self, batch) -> list[list[int]]:
        if len(batch.get("answers") or ()) != len(batch["questions"]):
            raise ConfigError("compute_loss needs one answer per question in batch['answers']")
        return [self._ids(self.answer_prefix + str(a).strip())[: self.max_answer_tokens] + [self.end_id]
                for a in batch["answers"]]

    def answer_tokens(self, answer: str) -> int:
        """How many tokens generation must produce to write ``answer`` (as the loss writes it)."""
        return len(self._ids(self.answer_prefix + str(answer).strip()))

    def text_limits(self, prompt: str) -> TextLimits:
        text = self.model.config.get_text_config()
        positions = getattr(text, "max_position_embeddings", None)
        image = torch.zeros(1, 3, self.image_size, self.image_size, dtype=torch.uint8)
        prompt_len = self._encode({"questions": [prompt], "images": image}, None, left=False)["input_ids"].shape[1]
        return TextLimits(self, "max_answer_tokens", 0, None if positions is None else positions - prompt_len - 1,
                          "use a language model with more positions or a shorter prompt")

    # ---- task protocol ------------------------------------------------------------------------------
    def compute_loss(self, batch) -> torch.Tensor:
        """Cross-entropy of the answer tokens (and the end-of-turn token) given the image and the prompt."""
        return self(batch)["loss"]

    def forward(self, batch) -> dict[str, torch.Tensor]:
        """The loss of the answers, with the logits and labels of the window it reads: the language model head runs
        from the position before the earliest answer token to the end (``logits_to_keep``), not over the image and
        prompt tokens that make most of the sequence and no loss (a 262k-vocabulary head over 300 positions is most
        of a step's time and its largest activation); transformers is not given the labels (it would compute a
        second loss over the whole sequence)."""
        inputs = self._encode(batch, self._answers(batch), left=False)
        labels = inputs.pop("labels")
        answered = (labels != -100).any(0).nonzero()
        first = int(answered[0]) if len(answered) else 1
        keep = labels.shape[1] - max(first, 1) + 1 if self._keeps_logits else 0
        out = self.model(**inputs, use_cache=False, **({"logits_to_keep": keep} if keep else {}))
        labels = labels[:, -keep:] if keep else labels
        logits, targets = out.logits[:, :-1].float(), labels[:, 1:]
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return {"loss": loss, "logits": out.logits, "labels": labels}

    @functools.cached_property
    def _keeps_logits(self) -> bool:
        """Whether the model's forward takes ``logits_to_keep`` (every family transformers ships here does; through
        a peft wrapper, its base model's)."""
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return "logits_to_keep" in inspect.signature(type(model).forward).parameters

    def loss_terms(self, batch) -> tuple[torch.Tensor, int]:
        """(sum of the answer tokens' cross-entropy, number of answer tokens), for token-normalised training."""
        out = self(batch)
        labels = out["labels"][:, 1:]
        n = int((labels != -100).sum())
        return out["loss"] * n, n

    @torch.no_grad()
    def generate(self, batch, max_new_tokens: int = 10, num_beams: int = 1) -> list[str]:
        """Answers continuing the prompt (greedy, or beam search with ``num_beams``) until the end-of-turn token."""
        inputs = self._encode(batch, None, left=True)
        inputs.pop("labels")
        was_training = self.training
        self.eval()
        try:
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                      eos_token_id=self.stop_ids, pad_token_id=self.pad_id)
        finally:
            self.train(was_training)
        texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [t.strip() for t in texts]

    def save_pretrained(self, path: str | os.PathLike):
        """A transformers folder: config, safetensors weights, tokenizer, image processor, chat template."""
        from pathlib import Path

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))
        self.processor.image_processor.save_pretrained(str(folder))
        settings = {k: getattr(self.processor, k) for k in _family(self.family)["processor"]
                    if k != "video_processor" and isinstance(getattr(self.processor, k, None), (int, float, str))}
        (folder / PROCESSOR_FILE).write_text(json.dumps(settings, indent=2))
        if getattr(self.processor, "chat_template", None):
            (folder / "chat_template.jinja").write_text(self.processor.chat_template)
        return folder


# ---- building and loading ----------------------------------------------------------------------------
def build(family: str, preset: str = "tiny", tokenizer=None, texts=None, max_question_tokens: int = 64,
          max_answer_tokens: int = 16, seed: int | None = 0, text_layers: int | None = None,
          vision_layers: int | None = None, width_divisor: int | None = None) -> HFVisionLanguage:
    """A fresh (randomly initialised) model of ``family`` with a tokenizer and processor; nothing is downloaded.

    ``preset``: ``tiny`` (CPU tests) or a real architecture (:data:`.families.FAMILIES`' presets; build those
    under ``torch.device("meta")`` to count or plan). A tiny model's tokenizer is trained on the built-in corpus
    plus ``texts`` and sized to it; a real preset keeps its vocabulary (its tokenizer comes with --pretrained).
    """
    fam = _family(family)
    _check_requirements(family)
    if tokenizer is None:
        tokenizer = family_tokenizer(family, texts)
    ids = {field: tokenizer.convert_tokens_to_ids(fam["tokens"][key]) for field, key in fam["ids"].items()}
    for field, tid in ids.items():
        if tid is None or tid == tokenizer.unk_token_id:
            raise ConfigError(f"{family}: the tokenizer has no {fam['tokens'][fam['ids'][field]]!r} token "
                              f"(config field {field})")
    ids.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    spec = _spec(family, preset)
    processor = family_processor(family, tokenizer, _image_processor(family, settings=spec.get("image_processor")),
                                 settings=spec.get("processor"))  # it may add tokens (PaliGemma's location ones)
    config = family_config(family, preset, vocab_size=len(tokenizer), token_ids=ids, text_layers=text_layers,
                           vision_layers=vision_layers, width_divisor=width_divisor)
    model = family_model(config, seed)
    if preset == "tiny" and seed is not None:
        _redraw_zeros(model, seed)
    return HFVisionLanguage(model, processor, family,
                            image_size=spec["image_size"], max_question_tokens=max_question_tokens,
                            max_answer_tokens=max_answer_tokens)


def _redraw_zeros(model: nn.Module, seed: int) -> None:
    """A random tiny model's zero-initialised weights (Gemma 3's input projection, Mllama's cross-attention gates,
    Gemma's norm offsets) drawn small and random instead, so that every part of it affects the loss (a released
    checkpoint's are trained: this is only for the tiny random models tests train)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_meta:  # built to count or to read names: nothing to draw
                return
            if not name.endswith("bias") and p.is_floating_point() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def load(path: str | os.PathLike, family: str, max_question_tokens: int = 64, max_answer_tokens: int = 16,
         strict: bool = True, preset: str = "tiny") -> HFVisionLanguage:
    """Load a local Hub-format folder of ``family`` strictly (missing, unexpected and mismatched weights named).
    The classes come from the family (and transformers' own tables), never from names in the folder."""
    fam = _family(family)
    folder = local_folder(path, family)
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise PeftmedError(f"{family}: cannot read {folder / 'config.json'}: {exc}") from exc
    if model_type != fam["model_type"]:
        other = next((n for n, f in FAMILIES.items() if f["model_type"] == model_type), None)
        raise ConfigError(f"{family}: {str(folder)!r} holds a {model_type!r} model" +
                          (f" (use --backbone {other})" if other else "") + f", not {fam['model_type']!r}")
    if not (folder / "preprocessor_config.json").is_file():
        raise ConfigError(f"{family}: {str(folder)!r} has no preprocessor_config.json: the family's processor "
                          f"(image sizes, normalisation) cannot be built; copy it from the checkpoint's snapshot")
    tokenizer = load_tokenizer(folder, family)
    chat = None
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        chat = template_file.read_text()
    elif getattr(tokenizer, "chat_template", None):
        chat = tokenizer.chat_template
    settings = {}
    if (folder / PROCESSOR_FILE).is_file():
        try:
            settings = json.loads((folder / PROCESSOR_FILE).read_text())
        except ValueError as exc:
            raise PeftmedError(f"{family}: {folder / PROCESSOR_FILE} is not JSON: {exc}") from exc
    processor = family_processor(family, tokenizer, _image_processor(family, folder), chat=chat, settings=settings)
    model = load_weights(model_class(model_type), folder, family, strict)
    size = _image_size(processor.image_processor, fam)
    return HFVisionLanguage(model, processor, family, image_size=size, max_question_tokens=max_question_tokens,
                            max_answer_tokens=max_answer_tokens)


def _image_size(image_processor, fam) -> int:
    size = getattr(image_processor, "size", None) or {}
    if isinstance(size, dict):
        for key in ("height", "shortest_edge", "longest_edge"):
            if isinstance(size.get(key), int) and size[key] <= 4096:
                return size[key]
    return int(fam["tiny"]["image_size"])


def _saved_tokenizer(folder):
    return saved_tokenizer(folder)


def _backbone(family: str) -> Backbone:
    fam = FAMILIES[family]
    return Backbone(
        name=family, components=LazyComponents(family), roles=ROLES, component_roles={"projector": PROJECTOR_ROLES},
        builder=functools.partial(build, family), loader=functools.partial(load, family=family),
        prefix_wrapper=make_prefix_capable, tokenizer_loader=_saved_tokenizer,
        description=f"transformers {fam['description']}", tasks=("vqa", "report"),
        depth_options={"vision_layers": ("vision",), "text_layers": ("llm",)}, width_option="width_divisor",
        unused=unused_modules,
        # the conformance kit builds every tiny backbone: one whose processor needs a missing package is not one
        tiny=all(importlib.util.find_spec(p) is not None for p in fam.get("requires", ())))


BACKBONES = tuple(_backbone(f) for f in FAMILIES)
PRESET_BACKBONES = tuple(
    dataclasses.replace(_backbone(family), name=preset, defaults={"preset": preset}, tiny=False,
                        description=spec["description"])
    for family, fam in FAMILIES.items() for preset, spec in fam["presets"].items())


def family_names() -> list[str]:
    return sorted(FAMILIES)


def parameter_count(family: str, preset: str) -> int:
    """The preset's parameter count, from a model built on the meta device."""
    with torch.device("meta"):
        model = family_model(family_config(family, preset, vocab_size=0, token_ids=None), seed=None)
    return sum(p.numel() for p in model.parameters())

