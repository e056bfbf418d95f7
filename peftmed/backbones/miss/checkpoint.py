"""Real MISS / BLIP checkpoints: key conversion, position-embedding interpolation, load report, folders.

BLIP's ``blip_vqa.py`` state dict (which MISS checkpoints share) names parameters
``visual_encoder.*`` (ViT with a fused ``attn.qkv``), ``text_encoder.*`` (the JTM) and
``text_decoder.bert.*`` / ``text_decoder.cls.predictions.*``. Loading splits ``qkv`` into this
model's q/k/v, maps the LM-head aliases (``cls.predictions.bias``; ``decoder.weight`` is tied to the
word embeddings), resizes ``pos_embed`` to the model's patch grid (2-D bicubic, as BLIP does), and
returns a :class:`LoadReport` of missing, unexpected and shape-mismatched keys. The report is
printed, returned, and by default (``strict=True``) any problem raises before a tensor is copied.

A model folder holds ``config.json`` (optional for a bare BLIP/MISS ``.pth``: the sizes are then read
off the tensors), the weights (``model.safetensors`` or a torch ``.pth``/``.pt``/``.bin``, read with
``weights_only=True``) and the tokenizer (``tokenizer.json`` or BERT ``vocab.txt``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ... import __version__
from ...errors import ConfigError, PeftmedError
from .config import MissConfig
from .model import MissForVQA
from .tokenizer import MissTokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "miss"
PREFIXES = ("visual_encoder.", "text_encoder.", "text_decoder.")
_QKV = re.compile(r"^(visual_encoder\.blocks\.\d+\.attn\.)qkv\.(weight|bias)$")
_TIED = "text_decoder.cls.predictions.decoder.weight"  # same tensor as the decoder's word embeddings
_WORDS = "text_decoder.bert.embeddings.word_embeddings.weight"
_HEAD_BIAS_ALIAS = ("text_decoder.cls.predictions.bias", "text_decoder.cls.predictions.decoder.bias")

# Tell-tale key prefixes of other architectures, for the report.
_OTHER_FORMATS = {
    "vision_model.": "a transformers BlipForQuestionAnswering / BlipModel checkpoint",
    "multi_modal_projector.": "a LLaVA checkpoint",
    "model.layers.": "a decoder-only language model checkpoint",
    "bert.": "a plain BERT checkpoint",
}


class CheckpointError(PeftmedError, ValueError):
    """A checkpoint (or model folder) that does not fit the model; carries the LoadReport when there is one."""

    def __init__(self, message: str, report: LoadReport | None = None):
        super().__init__(message)
        self.report = report


@dataclass
class LoadReport:
    source: str = ""
    architecture: str = "BLIP/MISS"  # what the checkpoint looks like
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, checkpoint, model shape)
    interpolated: list[str] = field(default_factory=list)  # position embeddings resized
    ignored: list[str] = field(default_factory=list)  # non-parameter buffers (e.g. position_ids)

    @property
    def foreign(self) -> bool:
        return self.architecture != "BLIP/MISS"

    @property
    def ok(self) -> bool:
        return not (self.foreign or self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"checkpoint {self.source or '(state dict)'}: {len(self.loaded)} tensors loaded"]
        if self.foreign:
            lines.append(f"  DIFFERENT ARCHITECTURE: this looks like {self.architecture}, not a BLIP/MISS "
                         f"state dict (keys under {', '.join(PREFIXES)})")
        for title, keys in (("missing (kept at their initial values)", self.missing),
                            ("unexpected (not used)", self.unexpected)):
            if keys:
                lines.append(f"  {title}: {len(keys)}")
                lines.extend(f"    {k}" for k in keys[:20])
                if len(keys) > 20:
                    lines.append(f"    ... and {len(keys) - 20} more")
        if self.mismatched:
            lines.append(f"  shape mismatch: {len(self.mismatched)}")
            lines.extend(f"    {k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.mismatched[:20])
        for k in self.interpolated:
            lines.append(f"  interpolated {k} to the model's patch grid (bicubic)")
        if self.ignored:
            lines.append(f"  ignored buffers: {', '.join(self.ignored)}")
        lines.append("  status: " + ("ok" if self.ok else "NOT a clean load"))
        return "\n".join(lines)


# ---- position embeddings ------------------------------------------------------------------------------
def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int, num_extra: int = 1) -> torch.Tensor:
    """Resize (1, extra + n, C) position embeddings to ``num_patches`` (square grids), as BLIP does.

    The ``num_extra`` leading tokens (CLS) are kept; the patch grid is resized with 2-D bicubic interpolation.
    """
    old = pos_embed.shape[1] - num_extra
    old_side, new_side = round(old ** 0.5), round(num_patches ** 0.5)
    if old_side * old_side != old or new_side * new_side != num_patches:
        raise CheckpointError(f"cannot interpolate position embeddings {list(pos_embed.shape)} to {num_patches} "
                              f"patches: both grids must be square")
    if old == num_patches:
        return pos_embed
    extra, grid = pos_embed[:, :num_extra], pos_embed[:, num_extra:]
    width = grid.shape[-1]
    grid = grid.reshape(1, old_side, old_side, width).permute(0, 3, 1, 2).float()  # (1, C, S, S)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, num_patches, width).to(pos_embed.dtype)
    return torch.cat([extra, grid], dim=1)


# ---- state dict conversion ----------------------------------------------------------------------------
def to_blip_state_dict(model: MissForVQA) -> dict[str, torch.Tensor]:
    """The model's weights under BLIP's key names (fused ViT ``qkv``, LM-head aliases), as separate tensors."""
    own = model.state_dict()
    if any(".base_layer." in k for k in own):
        raise CheckpointError("this model carries adapter layers; save the plain model (PeftModel.merge_and_unload())")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in own.items():
        m = re.match(r"^(visual_encoder\.blocks\.\d+\.attn\.)([qkv])\.(weight|bias)$", key)
        if m:
            if m.group(2) == "q":
                parts = [own[f"{m.group(1)}{p}.{m.group(3)}"] for p in "qkv"]
                out[f"{m.group(1)}qkv.{m.group(3)}"] = torch.cat(parts, dim=0).detach().clone()
            continue
        out[key] = tensor.detach().clone()  # clone: tied tensors are stored once per name (safetensors needs it)
    out[_HEAD_BIAS_ALIAS[0]] = out[_HEAD_BIAS_ALIAS[1]].clone()
    return out


def _detect(keys: list[str]) -> str:
    # tell-tales of other formats first: transformers' BLIP also has text_encoder.* keys
    for prefix, what in _OTHER_FORMATS.items():
        if any(k.startswith(prefix) for k in keys):
            return what
    if any(k.startswith(PREFIXES) for k in keys):
        return "BLIP/MISS"
    heads = sorted({k.split(".")[0] for k in keys})
    return f"an unknown architecture (top-level keys: {', '.join(heads[:8]) or 'none'})"


def _unwrap(state: dict) -> dict[str, torch.Tensor]:
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()
            if isinstance(v, torch.Tensor)}


def from_blip_state_dict(state: dict[str, torch.Tensor], model: MissForVQA) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Convert a BLIP/MISS state dict to this model's keys; returns (tensors that fit, report)."""
    state = _unwrap(state)
    report = LoadReport(architecture=_detect(list(state)))
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = _QKV.match(key)
        if m:
            if tensor.shape[0] % 3:
                report.mismatched.append((key, tuple(tensor.shape), ("3 * width", *tensor.shape[1:])))
                continue
            for part, chunk in zip("qkv", tensor.chunk(3, dim=0)):
                converted[f"{m.group(1)}{part}.{m.group(2)}"] = chunk
        elif key.endswith("position_ids"):
            report.ignored.append(key)
        elif key == _HEAD_BIAS_ALIAS[0]:
            converted.setdefault(_HEAD_BIAS_ALIAS[1], tensor)
        elif key == _TIED:
            converted.setdefault(_WORDS, tensor)  # the tie: one tensor under two names
        else:
            converted[key] = tensor
    expected = {k: v for k, v in model.state_dict().items() if k != _TIED}
    pos_key = "visual_encoder.pos_embed"
    if pos_key in converted and pos_key in expected:
        ours, theirs = expected[pos_key], converted[pos_key]
        if theirs.dim() == 3 and theirs.shape[-1] == ours.shape[-1] and theirs.shape[1] != ours.shape[1]:
            converted[pos_key] = interpolate_pos_embed(theirs, ours.shape[1] - 1)
            report.interpolated.append(pos_key)
    fitting: dict[str, torch.Tensor] = {}
    for key, tensor in converted.items():
        if key not in expected:
            report.unexpected.append(key)
        elif tuple(tensor.shape) != tuple(expected[key].shape):
            report.mismatched.append((key, tuple(tensor.shape), tuple(expected[key].shape)))
        else:
            fitting[key] = tensor
    report.missing = sorted(k for k in expected if k not in converted)
    report.unexpected.sort()
    report.loaded = sorted(fitting)
    return fitting, report


def load_blip_state_dict(model: MissForVQA, state: dict[str, torch.Tensor], *, strict: bool = True,
                         source: str = "", verbose: bool = True) -> LoadReport:
    """Load a BLIP/MISS state dict into ``model``; print and return the report.

    ``strict`` (default): any missing, unexpected or mismatched key, or a foreign architecture, raises
    :class:`CheckpointError` before the model is changed. Non-strict loads what fits and reports the rest.
    """
    fitting, report = from_blip_state_dict(state, model)
    report.source = source
    if verbose:
        print(report)
    if report.foreign or (strict and not report.ok):
        why = "is not a BLIP/MISS checkpoint" if report.foreign else "does not match the model"
        raise CheckpointError(f"checkpoint {source or '(state dict)'} {why} (strict load); "
                              f"pass strict=False to load what fits.\n{report}", report)
    with torch.no_grad():
        model.load_state_dict(fitting, strict=False)
    model.text_decoder.tie_weights()
    return report


# ---- config inference (a bare BLIP/MISS .pth has no config.json) ----------------------------------------
def infer_config(state: dict[str, torch.Tensor], **overrides) -> MissConfig:
    """Read the sizes of a BLIP/MISS state dict off its tensors (heads assume 64-wide heads, as BERT/ViT)."""
    s = _unwrap(state)
    try:
        patch = s["visual_encoder.patch_embed.proj.weight"]
        pos = s["visual_encoder.pos_embed"]
        words = s["text_encoder.embeddings.word_embeddings.weight"]
        positions = s["text_encoder.embeddings.position_embeddings.weight"]
        inter = s["text_encoder.encoder.layer.0.intermediate.dense.weight"]
        fc1 = s["visual_encoder.blocks.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise CheckpointError(f"cannot infer the MISS sizes: the checkpoint has no {exc.args[0]!r} "
                              f"(it looks like {_detect(list(s))}); add a config.json") from None

    def count(pattern: str) -> int:
        return len({m.group(1) for k in s if (m := re.match(pattern, k))})

    vision_width, text_width = patch.shape[0], words.shape[1]
    fields = dict(
        image_size=round((pos.shape[1] - 1) ** 0.5) * patch.shape[-1], patch_size=patch.shape[-1],
        vision_width=vision_width, vision_layers=count(r"^visual_encoder\.blocks\.(\d+)\."),
        vision_heads=max(1, vision_width // 64), vision_mlp_ratio=fc1.shape[0] / vision_width,
        text_width=text_width, text_layers=count(r"^text_encoder\.encoder\.layer\.(\d+)\."),
        text_heads=max(1, text_width // 64), intermediate_size=inter.shape[0], vocab_size=words.shape[0],
        max_position_embeddings=positions.shape[0],
    )
    fields.update(overrides)
    return MissConfig.from_dict(fields)


# ---- folders ------------------------------------------------------------------------------------------
def save_pretrained(model: MissForVQA, folder: str | Path, *, weights: str = "safetensors") -> Path:
    """Write config.json, the weights in BLIP key format (``model.safetensors`` or ``model.pth``) and the tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = to_blip_state_dict(model)
    if weights == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    elif weights == "pth":
        torch.save({"model": state}, folder / "model.pth")
    else:
        raise ConfigError(f"weights must be 'safetensors' or 'pth', got {weights!r}")
    meta = {"model_type": MODEL_TYPE, "peftmed_version": __version__, **model.config.to_dict()}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    model.tokenizer.save(folder)
    return folder


def _weights_file(folder: Path) -> Path:
    if (folder / WEIGHTS_FILE).is_file():
        return folder / WEIGHTS_FILE
    found = sorted(p for ext in ("*.safetensors", "*.pth", "*.pt", "*.bin") for p in folder.glob(ext))
    if not found:
        raise CheckpointError(f"no weights in {str(folder)!r}: expected {WEIGHTS_FILE} or a torch .pth/.pt/.bin file")
    return found[0]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # pickles with code, truncated files
        raise CheckpointError(f"cannot read {str(path)!r} as a torch state dict (weights_only=True): {exc}") from exc


def from_pretrained(folder: str | Path, *, strict: bool = True, verbose: bool = True, tokenizer: MissTokenizer | None = None,
                    device: str | torch.device | None = None, **overrides) -> MissForVQA:
    """Load a MISS model from a local folder; ``overrides`` (e.g. ``image_size=384``) change the config,
    and position embeddings are interpolated to a new image size."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {str(folder)!r} does not exist")
    if not any(folder.iterdir()):
        raise CheckpointError(f"model folder {str(folder)!r} is empty: expected {CONFIG_FILE}, weights "
                              f"({WEIGHTS_FILE} or .pth) and tokenizer files")
    state = read_state_dict(_weights_file(folder))
    if (folder / CONFIG_FILE).is_file():
        meta = json.loads((folder / CONFIG_FILE).read_text())
        kind = meta.pop("model_type", MODEL_TYPE)
        if kind != MODEL_TYPE:
            raise CheckpointError(f"{folder / CONFIG_FILE} describes a {kind!r} model, not {MODEL_TYPE!r}: "
                                  f"load it with the matching backbone")
        meta.pop("peftmed_version", None)
        config = MissConfig.from_dict({**meta, **overrides})
    else:
        config = infer_config(state, **overrides)
    tokenizer = tokenizer or MissTokenizer.load(folder)
    if len(tokenizer) != config.vocab_size:
        raise ConfigError(
            f"vocabulary mismatch in {str(folder)!r}: the tokenizer has {len(tokenizer)} tokens but the checkpoint's "
            f"embeddings have {config.vocab_size} rows; use the tokenizer the checkpoint was trained with"
        )
    with torch.device(device or "cpu"):
        model = MissForVQA(config, tokenizer)
    load_blip_state_dict(model, state, strict=strict, source=str(folder), verbose=verbose)
    return model
