"""``peftmed convert llava-med SRC DST``: an original-LLaVA-format checkpoint -> a folder ``hf-llava`` loads.

LLaVA-Med's released checkpoints (and LLaVA v1/v1.5's) are in the format of the LLaVA code base
(``LlavaMistralForCausalLM`` / ``LlavaLlamaForCausalLM``), not transformers' ``LlavaForConditionalGeneration``:

=================================================  ==============================================
original key                                       converted key
=================================================  ==============================================
``model.embed_tokens|layers|norm.*``               ``model.language_model.*``
``lm_head.weight``                                 ``lm_head.weight``
``model.mm_projector.0.*`` / ``.2.*`` (MLP)        ``model.multi_modal_projector.linear_1|2.*``
``model.mm_projector.*`` (linear, LLaVA v1)        ``model.multi_modal_projector.linear_1.*``
``model.vision_tower.vision_tower.vision_model.*`` ``model.vision_tower.*`` (the tower's own layout)
=================================================  ==============================================

The original code puts the image features in place of a sentinel id (-200); transformers uses a real
``<image>`` token. The converter adds ``<image>`` (and ``<pad>``) to the tokenizer and pads the embedding
and LM-head tables to a multiple of 64 rows, as the llava-hf conversions do; the new rows are the mean of
the existing ones (the ``<image>`` row is never read: image features replace it).

A checkpoint without the vision tower's weights (LLaVA v1.5 loads CLIP separately) needs
``--vision-tower FOLDER``: a CLIP vision checkpoint in safetensors (``vision_model.*`` keys).

Memory stays bounded: tensors are read one at a time from the source shards (safetensors, memory-mapped)
and written in output shards of ``--shard-size`` bytes. Pickled ``.bin`` weights are refused. Every key
must be mapped: an unknown one is an error naming it, never dropped.

Nothing is written until everything was checked: the config's types, its sizes against the shard headers
(layer counts, widths), every key's name and shape, the index (shards are read from the source folder only).
DST may not be, contain or lie inside a source folder. ``--overwrite`` replaces only the files an earlier
conversion wrote (``peftmed_convert.json`` lists them); a user's file of the same name is never removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ...errors import PeftmedError
from ...files import check_output_path, write_json_atomic
from .common import CLIP_MEAN, CLIP_STD, tensor_shapes, weight_files, write_image_stats
from .llava import llava_model

log = logging.getLogger("peftmed.convert")

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
PAD_TO = 64
VOCAB_TABLES = ("model.language_model.embed_tokens.weight", "lm_head.weight")

# CLIP towers the LLaVA family names in mm_vision_tower, when the checkpoint carries no vision config
CLIP_TOWERS = {
    "clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
    "clip-vit-large-patch14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768),
}
TEXT_TYPES = {"llava_mistral": "mistral", "mistral": "mistral", "llava": "llama", "llava_llama": "llama",
              "llama": "llama"}
TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "max_position_embeddings", "rms_norm_eps", "rope_theta", "sliding_window", "hidden_act", "vocab_size",
             "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_bias", "head_dim", "rope_scaling")


class ConversionError(PeftmedError):
    """A source checkpoint that does not have the shape of the format it is converted from."""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ConversionError(f"cannot read {str(path)!r}: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


# The config keys the converter reads, with the types they must have (a damaged or hand-edited config is
# named here, before anything is built). ``int+``: a whole number >= 1.
CONFIG_TYPES = {
    "hidden_size": "int+", "intermediate_size": "int+", "num_hidden_layers": "int+", "num_attention_heads": "int+",
    "num_key_value_heads": "int+", "max_position_embeddings": "int+", "vocab_size": "int+", "head_dim": "int+",
    "image_size": "int+", "patch_size": "int+", "projection_dim": "int+", "sliding_window": "int+?",
    "rms_norm_eps": "float+", "layer_norm_eps": "float+", "rope_theta": "float+", "hidden_act": "str",
    "tie_word_embeddings": "bool", "attention_bias": "bool", "mm_projector_type": "str", "mm_vision_tower": "str?",
    "mm_vision_select_layer": "int", "mm_vision_select_feature": "str", "model_type": "str",
    "bos_token_id": "int?", "eos_token_id": "int?", "rope_scaling": "dict?",
}


def _check_types(config: dict, path: Path) -> None:
    for key, kind in CONFIG_TYPES.items():
        if key not in config:
            continue
        value, optional = config[key], kind.endswith("?")
        base = kind.rstrip("?")
        if value is None and optional:
            continue
        if base.startswith("int"):
            ok = isinstance(value, int) and not isinstance(value, bool) and (base != "int+" or value >= 1)
            if key in ("bos_token_id", "eos_token_id") and isinstance(value, list):
                ok = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        elif base == "float+":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and value < float("inf")
        elif base == "bool":
            ok = isinstance(value, bool)
        elif base == "dict":
            ok = isinstance(value, dict)
        else:
            ok = isinstance(value, str)
        if not ok:
            want = {"int+": "a whole number >= 1", "int": "a whole number", "float+": "a positive number",
                    "bool": "true or false", "dict": "an object", "str": "a string"}[base]
            raise ConversionError(f"{path}: {key} must be {want}{' or null' if optional else ''}, got {value!r}")


def map_key(key: str, projector: str) -> list[str]:
    """Candidate converted names of an original LLaVA key, best first (empty: not a LLaVA key). The vision
    tower's names depend on the transformers version (``vision_model.`` kept or flattened): the converter
    takes the candidate the target model has."""
    if key == "lm_head.weight":
        return [key]
    m = re.match(r"model\.mm_projector\.(?:(\d+)\.)?(weight|bias)$", key)
    if m:
        index, what = m.groups()
        if projector == "linear" and index is None:
            return [f"model.multi_modal_projector.linear_1.{what}"]
        if projector == "mlp" and index in ("0", "2"):
            return [f"model.multi_modal_projector.linear_{1 if index == '0' else 2}.{what}"]
        return []
    if key.startswith("model.vision_tower.vision_tower."):
        return _vision_names(key[len("model.vision_tower.vision_tower."):])
    if re.match(r"model\.(embed_tokens|layers|norm)\.", key):
        return ["model.language_model." + key[len("model."):]]
    return []


def _vision_names(rest: str) -> list[str]:
    """``vision_model.X`` of a CLIP vision checkpoint -> the tower's name in LlavaForConditionalGeneration."""
    if rest.startswith("vision_model."):
        return ["model.vision_tower." + rest, "model.vision_tower." + rest[len("vision_model."):]]
    return ["model.vision_tower." + rest]


def _projector(config: dict) -> str:
    kind = config.get("mm_projector_type", "linear")
    if kind == "linear":
        return "linear"
    if kind == "mlp2x_gelu":
        return "mlp"
    raise ConversionError(f"mm_projector_type {kind!r} is not supported (linear or mlp2x_gelu, the projectors of "
                          f"LLaVA v1 and v1.5 / LLaVA-Med)")


def _vision_config(config: dict, vision_folder: Path | None, src: Path) -> dict:
    """The CLIP tower's sizes: from --vision-tower's config.json, else from the folder mm_vision_tower names
    when it is a local one (as the LLaVA code base allows), else from the known CLIP checkpoints."""
    named = str(config.get("mm_vision_tower") or "")
    folder = vision_folder
    if folder is None and named:
        for candidate in (Path(named), src / named):
            if (candidate / "config.json").is_file():
                folder = candidate
                break
    if folder is not None:
        data = _read_json(folder / "config.json")
        data = data.get("vision_config", data)
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "projection_dim", "hidden_act", "layer_norm_eps")
        return {k: data[k] for k in keys if k in data}
    name = named.rstrip("/").rsplit("/", 1)[-1]
    if name not in CLIP_TOWERS:
        raise ConversionError(f"the checkpoint names vision tower {named!r}, whose size peftmed does not know; pass "
                              f"--vision-tower FOLDER (a CLIP checkpoint with its config.json)")
    return dict(CLIP_TOWERS[name])


def _tokenizer(src: Path):
    """The source's tokenizer as a fast tokenizer, read without looking up any class named in its files."""
    from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

    cfg = _read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    specials = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token") if isinstance(cfg.get(k), str)}
    if (src / "tokenizer.json").is_file():
        try:
            return PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"), **specials)
        except Exception as exc:  # tokenizers raises its own exception types for a damaged file
            raise ConversionError(f"cannot read {src / 'tokenizer.json'} ({type(exc).__name__}: {str(exc)[:160]}); "
                                  f"the tokenizer file is damaged") from None
    if (src / "tokenizer.model").is_file():
        try:
            return LlamaTokenizerFast(vocab_file=str(src / "tokenizer.model"), legacy=False, **specials)
        except Exception as exc:  # sentencepiece/protobuf missing, or a damaged model file
            raise ConversionError(f"cannot read {src / 'tokenizer.model'} ({type(exc).__name__}: {exc}); reading a "
                                  f"sentencepiece model needs the sentencepiece package") from None
    raise ConversionError(f"{str(src)!r} has no tokenizer.json or tokenizer.model")


# LLaVA v1's single linear projector is written as transformers' two-layer projector with an identity
# activation and an identity second layer: linear_2(act(linear_1(x))) = I (W x + b) + 0, exactly W x + b, so plain
# ``LlavaForConditionalGeneration.from_pretrained`` reads the folder correctly (no layer left to a random init).
SYNTHESIZED = {"linear": ("model.multi_modal_projector.linear_2.weight", "model.multi_modal_projector.linear_2.bias")}


def _synthesized(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.eye(shape[0], dtype=dtype) if key.endswith("weight") else torch.zeros(shape, dtype=dtype)


def _plan(sources, projector: str, expected: dict[str, tuple]) -> list[tuple[Path, str, str]]:
    """(file, original key, converted key) for every tensor to write, checked against the target model's
    names and shapes (``expected``); unknown, doubled, mis-shaped or missing keys are an error."""
    plan, unknown, mismatched, taken = [], [], [], {}
    for file, kind, shapes in sources:
        for key, shape in shapes.items():
            if kind == "vision":
                if not key.startswith("vision_model."):
                    continue  # a full CLIP checkpoint also holds its text tower: not LLaVA's
                candidates = _vision_names(key)
            else:
                candidates = map_key(key, projector)
                if not candidates and ".rotary_emb." in key:
                    continue  # rotary tables are recomputed from the config
            if key.endswith("embeddings.position_ids"):
                continue  # a buffer (arange), saved by transformers before 4.31; the model makes its own
            new = next((c for c in candidates if c in expected), None)
            if new is None:
                unknown.append(key)
                continue
            if new in taken:
                raise ConversionError(f"{new} comes twice: from {taken[new]} and from {file.name}/{key} (a checkpoint "
                                      f"that holds its vision tower needs no --vision-tower)")
            want = expected[new]
            padded = new in VOCAB_TABLES and shape[1:] == want[1:] and shape[0] <= want[0]
            if shape != want and not padded:
                mismatched.append(f"{key} {list(shape)} (expected {list(want)} for {new})")
            taken[new] = f"{file.name}/{key}"
            plan.append((file, key, new))
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} key(s) are not LLaVA weights peftmed knows how to map "
                        f"(e.g. {', '.join(unknown[:5])})")
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) do not fit the config's sizes: {'; '.join(mismatched[:5])}")
    missing = sorted(set(expected) - set(taken) - set(SYNTHESIZED.get(projector, ())))
    if missing and any(not m.startswith("model.vision_tower.") for m in missing):
        problems.append(f"{len(missing)} weight(s) are missing (e.g. {', '.join(missing[:5])})")
    if problems:
        raise ConversionError("; ".join(problems) + "; nothing was written")
    return plan


class _ShardWriter:
    """Writes tensors into ``model-0000i-of-0000n.safetensors`` files of at most ``limit`` bytes each."""

    def __init__(self, dst: Path, limit: int):
        self.dst, self.limit = dst, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.limit:
            self.flush()
        self.pending[key] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"part-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.dst / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.size = {}, 0

    def finish(self) -> list[str]:
        """Name the shards model-0000i-of-0000n and write the index when there are several."""
        self.flush()
        n = len(self.files)
        if n == 1:
            (self.dst / self.files[0][0]).rename(self.dst / "model.safetensors")
            return ["model.safetensors"]
        names, weight_map = [], {}
        for i, (tmp, keys) in enumerate(self.files, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            (self.dst / tmp).rename(self.dst / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        write_json_atomic(self.dst / "model.safetensors.index.json",
                          {"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2)
        return names


MANIFEST = "peftmed_convert.json"  # the files a conversion wrote: all --overwrite may ever replace


def _check_folders(src: Path, dst: Path, vision: Path | None) -> None:
    """DST may not be, contain or lie inside a source folder: writing there could destroy what is read."""
    for what, folder in (("SRC", src), ("--vision-tower", vision)):
        if folder is None:
            continue
        a, b = folder.resolve(), dst.resolve()
        if a == b or a in b.parents or b in a.parents:
            relation = "is" if a == b else ("lies inside" if a in b.parents else "contains")
            raise ConversionError(f"DST {str(dst)!r} {relation} {what} {str(folder)!r}: the converted folder must be "
                                  f"apart from the checkpoint it is read from; choose another DST (nothing was "
                                  f"touched)")


def _previous_files(dst: Path) -> set[str]:
    """The files an earlier conversion into ``dst`` wrote (its manifest), else none."""
    path = dst / MANIFEST
    if not path.is_file():
        return set()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {f for f in data.get("files", []) if isinstance(f, str) and Path(f).name == f}
    except (OSError, ValueError, AttributeError, RecursionError):
        return set()


def _layer_counts(shapes: dict[str, tuple], pattern: str) -> int:
    found = {int(m.group(1)) for k in shapes if (m := re.search(pattern, k))}
    return max(found) + 1 if found else 0


def _check_sizes(config: dict, vision: dict, shapes: dict[str, tuple], where: str) -> None:
    """The config's sizes against the checkpoint's own tensors, from the shard headers, before anything is
    built (a config saying 10 million layers is refused in a moment, not after minutes of building)."""
    layers = _layer_counts(shapes, r"^model\.layers\.(\d+)\.")
    if layers and layers != config.get("num_hidden_layers", layers):
        raise ConversionError(f"{where}: config.json says num_hidden_layers {config['num_hidden_layers']}, the "
                              f"weights hold {layers} layers (model.layers.0-{layers - 1}); the config does not "
                              f"belong to these weights")
    embed = shapes.get("model.embed_tokens.weight")
    if embed is not None and len(embed) == 2 and embed[1] != config.get("hidden_size", embed[1]):
        raise ConversionError(f"{where}: config.json says hidden_size {config['hidden_size']}, "
                              f"model.embed_tokens.weight is {list(embed)}")
    tower = _layer_counts(shapes, r"vision_tower\.vision_tower\.vision_model\.encoder\.layers\.(\d+)\.") or \
        _layer_counts(shapes, r"^vision_model\.encoder\.layers\.(\d+)\.")
    if tower and tower != vision.get("num_hidden_layers", tower):
        raise ConversionError(f"{where}: the vision config says num_hidden_layers {vision['num_hidden_layers']}, the "
                              f"vision tower's weights hold {tower} layers")


def convert_llava(src, dst, *, vision_tower=None, shard_size: int = 2 * 1024**3, dtype: torch.dtype | None = None,
                  overwrite: bool = False) -> dict:
    """Convert an original LLaVA / LLaVA-Med checkpoint folder ``src`` into ``dst`` (see the module doc).

    ``dtype``: cast floating tensors (default: keep the checkpoint's). Everything is checked before anything
    is written; the files go to a temporary folder inside ``dst`` and are moved into place at the end, so a
    failure leaves ``dst`` as it was. ``overwrite`` replaces only files an earlier conversion wrote there
    (listed in its ``peftmed_convert.json``). Returns a summary dict."""
    from safetensors import safe_open
    from transformers import LlavaConfig


    src, dst = Path(src), Path(dst)
    vision_folder = Path(vision_tower) if vision_tower else None
    if not (src / "config.json").is_file():
        raise ConversionError(f"{str(src)!r} is not a checkpoint folder (no config.json)")
    if vision_folder is not None and not (vision_folder / "config.json").is_file():
        raise ConversionError(f"--vision-tower {str(vision_folder)!r} is not a checkpoint folder (no config.json)")
    _check_folders(src, dst, vision_folder)
    check_output_path(dst, flag="DST", kind="folder")
    previous = _previous_files(dst) if dst.is_dir() else set()
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(f"output folder {str(dst)!r} is not empty; choose another or pass --overwrite "
                              f"(files an earlier conversion wrote there are replaced, nothing else is touched)")
    config = _read_json(src / "config.json")
    _check_types(config, src / "config.json")
    text_type = TEXT_TYPES.get(str(config.get("model_type")))
    if text_type is None:
        raise ConversionError(f"config.json has model_type {config.get('model_type')!r}; expected one of "
                              f"{sorted(TEXT_TYPES)} (an original LLaVA / LLaVA-Med checkpoint)")
    projector = _projector(config)
    sources = [(f, "llava", tensor_shapes(f, "convert llava-med")) for f in weight_files(src, "convert llava-med")]
    if vision_folder is not None:
        sources += [(f, "vision", tensor_shapes(f, "convert llava-med --vision-tower"))
                    for f in weight_files(vision_folder, "convert llava-med --vision-tower")]
    vision = _vision_config(config, vision_folder, src)
    _check_types(vision, (vision_folder or src) / "config.json")
    _check_sizes(config, vision, {k: v for _, _, shapes in sources for k, v in shapes.items()}, str(src))

    tokenizer = _tokenizer(src)
    original_vocab = int(config.get("vocab_size") or len(tokenizer))
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    vocab = max(len(tokenizer), original_vocab)
    vocab = -(-vocab // PAD_TO) * PAD_TO

    text = {k: config[k] for k in TEXT_KEYS if k in config}
    text.update(model_type=text_type, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id)
    feature = config.get("mm_vision_select_feature", "patch")
    try:
        llava = LlavaConfig(
            vision_config=dict(vision, model_type="clip_vision_model"), text_config=text,
            image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            vision_feature_layer=int(config.get("mm_vision_select_layer", -2)),
            vision_feature_select_strategy="full" if feature == "cls_patch" else "default",
            projector_hidden_act="linear" if projector == "linear" else "gelu", tie_word_embeddings=False,
            peftmed_converted_from={"format": "llava", "model_type": config.get("model_type"),
                                    "mm_vision_tower": config.get("mm_vision_tower"), "original_vocab": original_vocab,
                                    "projector": projector},
        )
        with torch.device("meta"):  # the target's names and shapes, without memory
            expected = {k: tuple(v.shape) for k, v in llava_model(llava, seed=None).state_dict().items()}
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:  # transformers' own checks of a config
        raise ConversionError(f"{src / 'config.json'} does not describe a model transformers can build "
                              f"({type(exc).__name__}: {str(exc)[:200]})") from None
    plan = _plan(sources, projector, expected)  # every key mapped and checked before anything is written
    if not any(new.startswith("model.vision_tower.") for _, _, new in plan):
        raise ConversionError(f"{src} holds no vision tower weights (model.vision_tower.vision_tower.*); pass "
                              f"--vision-tower FOLDER with the CLIP checkpoint named in its config "
                              f"({config.get('mm_vision_tower')!r}) in safetensors")
    missing = sorted(set(expected) - {new for _, _, new in plan} - set(SYNTHESIZED.get(projector, ())))
    if missing:
        raise ConversionError(f"{len(missing)} weight(s) of the vision tower are missing (e.g. {', '.join(missing[:3])})"
                              f"; nothing was written")

    dst.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".peftmed-convert.", dir=dst))
    try:
        writer = _ShardWriter(staging, shard_size)
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for file, key, new in plan:
            by_file.setdefault(file, []).append((key, new))
        first_dtype = None
        for file, keys in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key, new in keys:
                        t = f.get_tensor(key)
                        if new in VOCAB_TABLES and t.shape[0] < vocab:
                            extra = t.float().mean(0, keepdim=True).expand(vocab - t.shape[0], -1).to(t.dtype)
                            t = torch.cat([t, extra])
                        if dtype is not None and t.is_floating_point():
                            t = t.to(dtype)
                        first_dtype = first_dtype or t.dtype
                        writer.add(new, t)
            except PeftmedError:
                raise
            except Exception as exc:  # a shard whose data is cut short raises safetensors' own errors
                raise ConversionError(f"cannot read the tensors of {str(file)!r} ({type(exc).__name__}: "
                                      f"{str(exc)[:160]}); the file is damaged or incomplete; nothing was written "
                                      f"to {str(dst)!r}") from None
        for key in SYNTHESIZED.get(projector, ()):
            writer.add(key, _synthesized(key, expected[key], first_dtype or torch.float32))
        shards = writer.finish()
        llava.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        write_image_stats(staging, int(vision["image_size"]), CLIP_MEAN, CLIP_STD, "CLIPImageProcessor")
        written = sorted(p.name for p in staging.iterdir())
        clash = sorted(n for n in written if (dst / n).exists() and n not in previous)
        if clash:
            raise ConversionError(f"{str(dst)!r} holds {', '.join(clash[:5])}, which no earlier conversion wrote; "
                                  f"--overwrite replaces only a conversion's own files. Choose another DST")
        for old in previous - set(written):  # an earlier conversion's shards this one does not replace
            if (dst / old).is_file():
                (dst / old).unlink()
        for name in written:
            os.replace(staging / name, dst / name)
        write_json_atomic(dst / MANIFEST, {"converter": "peftmed convert llava-med", "files": written + [MANIFEST]})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary = {"shards": shards, "bytes": writer.total, "vocab": vocab, "original_vocab": original_vocab,
               "projector": projector, "text": text_type, "image_token_id": llava.image_token_index}
    log.info("converted %s -> %s: %s", src, dst, summary)
    return summary


CONVERTERS = {"llava-med": convert_llava, "llava": convert_llava}
