"""What the HF VQA adapters share: image preparation (``peftmed.backbones.images``), question
truncation accounting, and saving/loading a local folder (model + tokenizer + image statistics) without the hub.

A folder written by ``save_pretrained`` is a regular transformers folder (``config.json``, weights,
tokenizer files) plus ``preprocessor_config.json`` with ``image_mean``, ``image_std`` and ``size``
(the keys transformers' image processors use, so a folder of a real checkpoint reads the same way).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ...errors import ConfigError, PeftmedError
from ..images import CLIP_MEAN, CLIP_STD, prepare_images  # noqa: F401  (re-exported for the adapters)

log = logging.getLogger("peftmed.backbones.hf")

PREPROCESSOR_FILE = "preprocessor_config.json"


def local_folder(path: str | os.PathLike, what: str) -> Path:
    """A local model folder holding ``config.json``; anything else is a clear error (never the hub)."""
    folder = Path(path)
    if not folder.exists():
        raise PeftmedError(f"{what}: model folder {str(folder)!r} does not exist (models load from a local folder; "
                           f"nothing is downloaded)")
    if not folder.is_dir():
        raise PeftmedError(f"{what}: {str(folder)!r} is a file; pass the folder that holds config.json")
    if not any(folder.iterdir()):
        raise PeftmedError(f"{what}: model folder {str(folder)!r} is empty; expected config.json, weights and "
                           f"tokenizer files (as written by save_pretrained)")
    if not (folder / "config.json").is_file():
        raise PeftmedError(f"{what}: model folder {str(folder)!r} has no config.json "
                           f"(found: {', '.join(sorted(p.name for p in folder.iterdir())[:8])})")
    return folder


def read_image_stats(folder: Path, default_size: int, default_mean, default_std) -> tuple[int, tuple, tuple]:
    """image size, mean, std from the folder's preprocessor_config.json, else the defaults given."""
    file = folder / PREPROCESSOR_FILE
    if not file.is_file():
        return default_size, tuple(default_mean), tuple(default_std)
    data = json.loads(file.read_text())
    size = data.get("crop_size") or data.get("size") or default_size
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or default_size
    return int(size), tuple(data.get("image_mean", default_mean)), tuple(data.get("image_std", default_std))


def write_image_stats(folder: Path, size: int, mean, std, processor_type: str) -> None:
    data = {
        "image_processor_type": processor_type, "do_resize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean), "image_std": list(std),
        "size": {"height": size, "width": size},
    }
    (folder / PREPROCESSOR_FILE).write_text(json.dumps(data, indent=2))


def load_tokenizer(folder: Path, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises several types for a folder without tokenizer files
        raise PeftmedError(f"{what}: cannot load the tokenizer of {str(folder)!r} ({type(exc).__name__}: {exc}); "
                           f"the folder needs the tokenizer files written by tokenizer.save_pretrained") from exc


def saved_tokenizer(folder) -> object:
    """A fast tokenizer written by ``save_pretrained`` into a run folder, read as the generic
    ``PreTrainedTokenizerFast`` (no class named in the folder is looked up)."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise PeftmedError(f"no tokenizer.json in {str(folder)!r} (expected a tokenizer written by save_pretrained)")
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises several types for broken tokenizer files
        raise PeftmedError(f"cannot read the tokenizer in {str(folder)!r}: {type(exc).__name__}: {exc}") from exc


WIDTH_KEYS = ("hidden_size", "intermediate_size", "projection_dim", "head_dim")


def narrower(part: dict, divisor: int, what: str) -> dict:
    """A layer stack's config with every width divided by ``divisor``, the number of heads kept (each head
    narrower): a model whose activations scale as the real one's (``peftmed plan`` measures two of these and
    extrapolates to the real width)."""
    if not isinstance(divisor, int) or isinstance(divisor, bool) or divisor < 1:
        raise ConfigError(f"{what}: width_divisor must be a positive integer, got {divisor!r}")
    out = dict(part)
    for key in WIDTH_KEYS:
        if out.get(key):
            if out[key] % divisor:
                raise ConfigError(f"{what}: {key}={out[key]} is not divisible by width_divisor={divisor}")
            out[key] //= divisor
    heads = out.get("num_attention_heads")
    if heads and out.get("hidden_size") and (out["hidden_size"] % heads or (out["hidden_size"] // heads) % 2):
        raise ConfigError(f"{what}: width_divisor={divisor} leaves hidden_size={out['hidden_size']} for {heads} heads; "
                          f"choose a smaller divisor")
    return out


def preset_spec(presets: dict, preset: str, what: str, image_size=None, vision_layers=None, text_layers=None,
                width_divisor: int | None = None) -> dict:
    """A copy of ``presets[preset]`` (``{"vision": {...}, "text": {...}}``) with the image size and the depths of
    its layer stacks set (a shallower or deeper model of the same widths, e.g. for peftmed plan), and with
    ``width_divisor`` every width divided (the heads kept); each value is checked: an image side is a positive
    multiple of the patch size."""
    if preset not in presets:
        raise ConfigError(f"{what}: unknown preset {preset!r}; expected one of {sorted(presets)}")
    spec = copy.deepcopy(presets[preset])
    if image_size is not None:
        patch = int(spec["vision"].get("patch_size", 1))
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < patch \
                or image_size % patch:
            raise ConfigError(f"{what}: image_size must be a positive multiple of the patch size {patch}, "
                              f"got {image_size!r}")
        spec["vision"]["image_size"] = image_size
    for part, layers in (("vision", vision_layers), ("text", text_layers)):
        if layers is not None:
            if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
                raise ConfigError(f"{part}_layers must be a positive integer, got {layers!r}")
            spec[part]["num_hidden_layers"] = layers
    if width_divisor is not None and width_divisor != 1:
        for part in ("vision", "text"):
            spec[part] = narrower(spec[part], width_divisor, f"{what} {part}")
    return spec


def unused_tower_modules(tower_path: str, tower: nn.Module, feature_layer, *, final_norm: str | None) -> list[str]:
    """Modules of a vision tower that feed nothing when a model takes its features from
    ``hidden_states[feature_layer]`` (an int or a list of them): the layers after the deepest one taken, and
    the tower's final norm (``final_norm``) when the features are not its last output."""
    layers = next((m for n, m in tower.named_modules() if n.endswith("encoder.layers") or n == "layers"), None)
    if layers is None:
        return []
    count = len(layers)
    picks = list(feature_layer) if isinstance(feature_layer, (list, tuple)) else [feature_layer]
    deepest = max(p if p >= 0 else count + 1 + p for p in picks)  # hidden_states[k]: the output of layer k - 1
    prefix = next(n for n, m in tower.named_modules() if m is layers)
    out = [f"{tower_path}.{prefix}.{i}" for i in range(deepest, count)]
    if final_norm is not None and hasattr(tower, final_norm):
        out.append(f"{tower_path}.{final_norm}")
    return out


def seeded_model(model_class, config, seed: int | None):
    """``model_class(config)`` with weights drawn from ``seed`` (the same model every build), leaving the
    caller's global random state as it was."""
    if seed is None:
        return model_class(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)


def load_weights(model_class, folder: Path, what: str, strict: bool = True):
    """``model_class.from_pretrained(folder)`` with a report of missing, shape-mismatched and unexpected
    weights: an error with ``strict`` (the default) for the first two, never a silent re-initialisation."""
    model, info = model_class.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                              ignore_mismatched_sizes=True)  # we report them ourselves
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or ()))
    unexpected = sorted(info.get("unexpected_keys") or ())
    _report(folder, what, strict, missing, mismatched, unexpected)
    return model


def weight_files(folder: Path, what: str) -> list[Path]:
    """The safetensors files of a checkpoint folder (one file, or the shards its index names); pickled
    ``.bin`` weights are refused (loading them would run code from the file). An index is read like a
    manifest: a JSON object whose ``weight_map`` maps names to file names of this folder (a name that leaves
    the folder, e.g. ``/etc/passwd`` or ``../x``, is refused before anything is opened)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise PeftmedError(f"{what}: {index} is not valid JSON ({str(exc)[:120]}); the index is damaged") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise PeftmedError(f"{what}: {index} must hold {{\"weight_map\": {{tensor name: shard file}}}}; "
                               f"the index is damaged")
        names = sorted(set(weight_map.values()))
        for name in names:  # a plain file name (a Hub snapshot's shards may be links into its blob store)
            if Path(name).name != name or name in (".", "..") or "\\" in name:
                raise PeftmedError(f"{what}: {index} names shard {name!r}, which is not a file name inside "
                                   f"{str(folder)!r}; shards are read from the checkpoint folder only")
        files = [folder / n for n in names]
        absent = [str(f.name) for f in files if not f.is_file()]
        if absent:
            raise PeftmedError(f"{what}: {index} names shard(s) that are not in the folder: {', '.join(absent[:5])}")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if files:
        return files
    pickled = sorted(p.name for p in folder.glob("*.bin"))
    if pickled:
        raise PeftmedError(f"{what}: {str(folder)!r} holds pickled weights ({', '.join(pickled[:3])}); peftmed reads "
                           f"safetensors only (a pickle can run code). Convert them to safetensors first")
    raise PeftmedError(f"{what}: no *.safetensors weights in {str(folder)!r}")


def tensor_shapes(file: Path, what: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a safetensors file, from its header; a truncated or damaged file
    (an interrupted download) is an error naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged header or a short file
        raise PeftmedError(f"{what}: {str(file)!r} is not a complete safetensors file ({type(exc).__name__}: "
                           f"{str(exc)[:160]}); it was damaged or not fully downloaded") from None


def load_state_strict(model: nn.Module, folder: Path, what: str, strict: bool = True) -> nn.Module:
    """Copy a folder's safetensors weights into ``model`` tensor by tensor, with the same report as
    :func:`load_weights`: missing and shape-mismatched weights are an error with ``strict``."""
    from safetensors import safe_open

    own = model.state_dict()
    seen, mismatched, unexpected = set(), [], []
    with torch.no_grad():
        for file in weight_files(folder, what):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key not in own:
                        unexpected.append(key)
                        continue
                    t = f.get_tensor(key)
                    if tuple(t.shape) != tuple(own[key].shape):
                        mismatched.append(f"{key} {tuple(t.shape)} vs {tuple(own[key].shape)}")
                        continue
                    own[key].copy_(t)
                    seen.add(key)
    tied = {k for k in own if k.endswith("lm_head.weight")} if getattr(model.config, "tie_word_embeddings", False) \
        else set()
    missing = sorted(set(own) - seen - tied)
    _report(folder, what, strict, missing, sorted(mismatched), sorted(unexpected))
    return model


def _report(folder: Path, what: str, strict: bool, missing, mismatched, unexpected) -> None:
    lines = [f"{label} ({len(keys)}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
             for label, keys in (("missing", missing), ("shape-mismatched", mismatched), ("unexpected", unexpected))
             if keys]
    if lines:
        message = f"{what}: checkpoint {str(folder)!r} does not fit the model: " + "; ".join(lines)
        if strict and (missing or mismatched):
            raise PeftmedError(message + ". Pass strict=False to load anyway (those weights stay randomly "
                                         "initialised)")
        log.warning(message)


class VQAModule(nn.Module):
    """Base of the HF VQA wrappers: images, questions, truncation accounting, save_pretrained."""

    processor_type = "BlipImageProcessor"

    def __init__(self, model: nn.Module, tokenizer, image_size: int, image_mean, image_std,
                 max_question_tokens: int):
        super().__init__()
        if max_question_tokens < 4:
            raise ConfigError(f"max_question_tokens must be >= 4, got {max_question_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.max_question_tokens = int(max_question_tokens)
        self.truncated_questions = 0  # questions cut to max_question_tokens so far (reported, not silent)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3|1, S, S) -> normalised floats; wrong size, channels or dtype is a ShapeError."""
        return prepare_images(images.to(self.device), self.image_size, self.image_mean, self.image_std, self.dtype)

    def example_inputs(self, batch: int = 2, seq: int | None = None, generator: torch.Generator | None = None):
        """(batch,) of random images and questions/answers from the built-in corpus (for the test kit)."""
        from .tokenizer import CORPUS  # deferred: the tokenizer module imports the tokenizers package

        g = generator or torch.Generator().manual_seed(0)
        size = self.image_size
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
        picks = torch.randint(0, len(CORPUS), (batch,), generator=g).tolist()
        pairs = [CORPUS[i].split("? ") for i in picks]
        return ({"images": images, "questions": [q + "?" for q, _ in pairs], "answers": [a for _, a in pairs],
                 "qids": picks},)

    def _count_truncated(self, lengths: list[int], limit: int) -> None:
        cut = sum(n > limit for n in lengths)
        if cut:
            self.truncated_questions += cut
            log.warning("%d question(s) longer than %d tokens were truncated (%d so far)",
                        cut, limit, self.truncated_questions)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write a transformers folder (config, safetensors weights, tokenizer) + image statistics."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))
        write_image_stats(folder, self.image_size, self.image_mean, self.image_std, self.processor_type)
        return folder
