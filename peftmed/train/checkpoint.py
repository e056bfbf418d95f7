"""Training checkpoints, written atomically so a crash never leaves a half-written one in use.

Layout under ``<output>/checkpoints``::

    latest                  one line: the name of the newest complete checkpoint
    step-00000100/
        adapter/            the adapter (adapter.json + adapter.safetensors), loadable by peftmed.load_adapter
        weights.safetensors the trainable tensors, for a model that is not a PeftModel
        trainer_state.pt    optimizer, scheduler, fp16 loss-scaler and RNG states (tensors and plain dicts;
                            weights_only load)
        trainer.json        step, data position, config, recipe, backbone, loss history

A checkpoint is written into a temporary folder, renamed into place, and only then named in
``latest`` (itself replaced atomically: temp file + ``os.replace``). A crash at any point leaves
``latest`` naming the previous, complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import files
from ..errors import PeftmedError
from ..model import PeftModel
from ..recipe import Recipe

LATEST = "latest"
META = "trainer.json"
STATE = "trainer_state.pt"
WEIGHTS = "weights.safetensors"
ADAPTER = "adapter"
FORMAT = "peftmed-checkpoint"


class CheckpointError(PeftmedError, ValueError):
    """A checkpoint that is missing, corrupt, or belongs to another run (recipe, backbone)."""


# ---- RNG states as tensors (so torch.load(weights_only=True) reads them) ------------------------------
def rng_state() -> dict[str, Any]:
    """The RNG states of torch (CPU and CUDA), numpy and python, as tensors and numbers."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))


# ---- writing -----------------------------------------------------------------------------------------
def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace`` (``peftmed.files``)."""
    files.write_json_atomic(path, data)


def write_checkpoint(root: Path, step: int, *, model, trainable: Mapping[str, torch.Tensor],
                     state: Mapping[str, Any], meta: Mapping[str, Any], keep: int = 1) -> Path:
    """Write checkpoint ``step-NNNNNNNN`` under ``root`` atomically; prune to the newest ``keep``.

    ``model`` is saved as an adapter folder when it is a PeftModel (else ``trainable`` goes to
    weights.safetensors); ``state`` (optimizer, scheduler, RNG) goes through torch.save; ``meta``
    to JSON. A failed write (disk full...) raises CheckpointError and leaves the previous checkpoint
    in place.
    """
    root = Path(root)
    name = f"step-{step:08d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        final = _write_checkpoint(root, name, model=model, trainable=trainable, state=state, meta=meta)
    except (OSError, RuntimeError) as exc:  # disk full, read-only folder; safetensors raises its own type
        try:
            previous = latest_checkpoint(root) if root.is_dir() else None
        except CheckpointError:
            previous = None
        if previous is not None:
            advice = (f"the previous checkpoint {previous} is kept: free some disk space (or move the run) and "
                      f"continue from it with --resume")
        else:
            advice = (f"no earlier checkpoint exists, so the {step} step(s) trained so far are lost (--save-every N "
                      f"keeps checkpoints along the way): free some disk space and train again")
        raise CheckpointError(
            f"could not write checkpoint {name} under {str(root)!r}: {type(exc).__name__}: {exc}; {advice}") from exc
    prune(root, keep)
    return final


def _write_checkpoint(root: Path, name: str, *, model, trainable, state, meta) -> Path:
    from safetensors.torch import save_file


    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}.", dir=root))
    try:
        if isinstance(model, PeftModel):
            model.save_adapter(tmp / ADAPTER, tensors=trainable)
        else:
            save_file({k: t.detach().contiguous().cpu() for k, t in trainable.items()}, str(tmp / WEIGHTS))
        with open(tmp / STATE, "wb") as fh:
            torch.save(dict(state), fh)
            fh.flush()
            os.fsync(fh.fileno())
        (tmp / META).write_text(json.dumps({"format": FORMAT, **meta}, indent=2))
        files.fsync_dir(tmp)
        if final.exists():  # left by a crash after the rename but before `latest` named it
            shutil.rmtree(final)
        os.replace(tmp, final)
        files.fsync_dir(root)
        (root / LATEST).parent.mkdir(parents=True, exist_ok=True)
        files.write_text_atomic(root / LATEST, name + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Remove what an interrupted checkpoint write left behind (``.tmp-step-*`` folders, ``.latest.*``
    files): only names this module creates, so nothing else in the folder is touched."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for stale in [*root.glob(".tmp-step-*"), *root.glob(f".{LATEST}.*{files.TMP_SUFFIX}")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (never the one ``latest`` names); drop stale temp folders."""
    latest = latest_checkpoint(root)
    steps = sorted(p for p in root.glob("step-*") if is_checkpoint(p))
    for old in steps[:-keep] if keep > 0 else steps:
        if latest is None or old.resolve() != latest.resolve():
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint folder this module wrote (its trainer.json says so)."""
    try:
        return Path(path).is_dir() and json.loads((Path(path) / META).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


# ---- reading -----------------------------------------------------------------------------------------
def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``root/latest`` names, or None when there is none."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{pointer} cannot be read ({exc}); it was damaged") from None
    if not re.fullmatch(r"step-\d{8}", name):
        raise CheckpointError(f"{pointer} names {name[:80]!r}, which is not a checkpoint of this folder (expected "
                              f"step-NNNNNNNN, a folder beside it); it was edited or damaged: fix it or remove it")
    path = root / name
    return path if (path / META).is_file() else None


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint, a checkpoints root, or a training output folder."""
    path = Path(path)
    if (path / META).is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(
        f"no checkpoint to resume from in {str(path)!r} (expected {path}/checkpoints/{LATEST} naming a "
        f"step-* folder with {META}); train without --resume to start afresh"
    )


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((Path(ckpt) / META).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: cannot read {META}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt / META} is not a peftmed checkpoint (format is not {FORMAT!r})")
    _check_meta(meta, Path(ckpt) / META)
    return meta


# what a resume reads from trainer.json, with the types it must have (an edited or damaged file is named here)
META_TYPES: dict[str, tuple[type, ...]] = {
    "step": (int,), "epoch": (int,), "samples": (int,), "train_seconds": (int, float), "losses": (list,),
    "lrs": (list,), "evals": (list,), "config": (dict,), "sample_in_epoch": (int,), "batch_in_epoch": (int,),
    "global_batch": (int,), "world_size": (int,), "dataset_size": (int,), "backbone": (str, type(None)),
    "recipe_json": (dict, type(None)),
}
REQUIRED_META = ("step", "epoch", "samples", "train_seconds", "losses", "lrs", "evals", "config")


def _check_meta(meta: dict, path: Path) -> None:
    for key in REQUIRED_META:
        if key not in meta:
            raise CheckpointError(f"{path} lacks {key!r}; the checkpoint is damaged (resume from another one)")
    for key, kinds in META_TYPES.items():
        if key in meta:
            value = meta[key]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise CheckpointError(f"{path}: {key} is {value!r}, expected {' or '.join(k.__name__ for k in kinds)}; "
                                      f"the checkpoint was edited or damaged")
            if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                raise CheckpointError(f"{path}: {key} is {value!r}, expected a count >= 0")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in meta["losses"] + meta["lrs"]):
        raise CheckpointError(f"{path}: losses and lrs must be lists of numbers; the checkpoint is damaged")
    if not all(isinstance(e, dict) for e in meta["evals"]):
        raise CheckpointError(f"{path}: evals must be a list of objects; the checkpoint is damaged")


def read_state(ckpt: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(ckpt) / STATE
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated files raise assorted pickle/zip errors
        # torch's own message goes on to suggest weights_only=False, which would run code from the file
        reason = str(exc).split("\n")[0].split(" Re-running `torch.load`")[0][:200]
        raise CheckpointError(f"checkpoint state {str(path)!r} is missing, damaged or holds objects other than "
                              f"tensors and plain values ({type(exc).__name__}: {reason}); peftmed never unpickles "
                              f"other objects. Resume from another checkpoint or train again") from None


def read_trainable(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    path = ckpt / ADAPTER / "adapter.safetensors"
    if not path.is_file():
        path = ckpt / WEIGHTS
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint weights {str(path)!r} are missing or corrupt: {exc}") from exc


def check_same_run(meta: Mapping[str, Any], *, backbone: str | None, recipe: Mapping | None,
                   components: list[str] | None) -> None:
    """Refuse to resume a checkpoint of another backbone or recipe, naming the difference."""
    if meta.get("backbone") != backbone:
        raise CheckpointError(
            f"cannot resume: the checkpoint was trained on backbone {meta.get('backbone')!r}, this run uses "
            f"{backbone!r}"
        )
    if recipe is None and meta.get("recipe_json") is None:
        return
    if recipe is None or meta.get("recipe_json") is None:
        raise CheckpointError("cannot resume: one of the checkpoint and this run has a recipe, the other has not")
    old, new = Recipe.from_dict(meta["recipe_json"]), Recipe.from_dict(recipe)
    comps = components or sorted(set(old.entries) | set(new.entries))
    a, b = old.resolve(comps), new.resolve(comps)
    diffs = []
    for comp in comps:
        ta = "+".join(c.to_text() for c in a.get(comp, ())) or "frozen"
        tb = "+".join(c.to_text() for c in b.get(comp, ())) or "frozen"
        if ta != tb:
            diffs.append(f"{comp}: checkpoint {ta}, this run {tb}")
    if diffs:
        raise CheckpointError(
            f"cannot resume: the checkpoint was trained with recipe {old.to_text()!r}, this run uses "
            f"{new.to_text()!r} ({'; '.join(diffs)}); use the same recipe or another --output"
        )
