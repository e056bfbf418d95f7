"""The results folder: per-job files written atomically, tidy JSON/CSV, run metadata, version checks.

Layout of a results folder::

    results.json        {"format", "format_version", "meta": {...}, "rows": [one dict per job]}
    results.csv         tidy rows: recipe, provider, metric, value
    runs/<label>.<provider>.json         one finished job (what --resume skips)
    predictions/<label>.<provider>.json  qid -> generated answer
    plots/*.png, report.md

A folder written by an incompatible bench format is refused with its version.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from .. import __version__
from ..baselines import peft_version
from ..errors import PeftmedError
from ..files import write_text_atomic
from ..plugins import plugin_versions
from .suites import slug

FORMAT = "peftmed-bench"
FORMAT_VERSION = 2  # 2: rows per seed, a summary with intervals and paired tests

# The figures of a row, in table order; each becomes one tidy CSV row per (recipe, provider), followed by
# the task's scores (any other number in the row).
METRICS = ("trainable", "trainable_percent", "total_params", "peak_memory_mib", "throughput",
           "step_time_median_s", "train_time_s", "steps_done", "final_loss", "eval_time_s", "job_time_s")
NOT_FIGURES = {"label", "recipe", "provider", "status", "error", "traceback", "row", "memory_method", "device",
               "peft_note", "resumed", "metrics_version", "n_train", "n_test", "seed", "seeds", "n_seeds",
               "max_new_tokens", "answers_reachable", "answers_total", "by_seed", "seeds_above_frozen",
               "seeds_forgetting", "throughput_sd", "peak_memory_mib_sd"}


def figures(row: dict[str, Any]) -> list[str]:
    """The numeric keys of a row: the bench's METRICS first, then the task's scores in row order."""
    rest = [k for k, v in row.items() if k not in METRICS and k not in NOT_FIGURES
            and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return [k for k in METRICS if k in row] + rest


class ResultsError(PeftmedError):
    """A results folder that cannot be used (missing, incompatible version, other configuration)."""


def write_atomic(path: Path, text: str) -> None:
    """Temp file in the same folder + rename: a reader (or a resumed run) never sees half a file."""
    write_text_atomic(path, text)


def _json_default(value):
    return str(value)


def dumps(data: Any) -> str:
    # NaN is not JSON: write null, so any JSON reader can load results
    return json.dumps(_nan_to_none(data), indent=2, default=_json_default, allow_nan=False)


def _nan_to_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def job_file(folder: Path, label: str, provider: str, seed: int = 0) -> Path:
    return folder / "runs" / f"{slug(label)}.{provider}.s{seed}.json"


def predictions_file(folder: Path, label: str, provider: str, seed: int = 0, source: bool = False) -> Path:
    """A job's predictions on the target's test records (``source``: on the source domain's, for forgetting)."""
    return folder / "predictions" / f"{slug(label)}.{provider}.s{seed}{'.source' if source else ''}.json"


def save_job(folder: Path, row: dict[str, Any], fingerprint: dict[str, Any], seed: int = 0) -> None:
    row = dict(row)
    predictions = row.pop("predictions", None)
    if predictions is not None:
        write_atomic(predictions_file(folder, row["label"], row["provider"], seed), dumps(predictions))
    on_source = row.pop("source_predictions", None)
    if on_source is not None:
        write_atomic(predictions_file(folder, row["label"], row["provider"], seed, source=True), dumps(on_source))
    write_atomic(job_file(folder, row["label"], row["provider"], seed), dumps({"fingerprint": fingerprint, "row": row}))


def load_job(folder: Path, label: str, provider: str, fingerprint: dict[str, Any], seed: int = 0) -> dict[str, Any] | None:
    """The finished row of a job, if one was written with the same settings (else None: rerun it)."""
    path = job_file(folder, label, provider, seed)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a damaged file is a job not done
    if data.get("fingerprint") != json.loads(dumps(fingerprint)):
        return None
    return data["row"]


def load_predictions(folder: Path, label: str, provider: str, seed: int = 0,
                     source: bool = False) -> dict[str, str] | None:
    path = predictions_file(folder, label, provider, seed, source)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---- metadata ------------------------------------------------------------------------------------
def _version(module: str) -> str | None:
    try:
        import importlib.metadata as md

        return md.version(module)
    except Exception:
        return None


def git_sha(cwd: Path | None = None) -> str | None:
    """The commit of the peftmed source tree, with '+dirty' when it has changes (None outside git)."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_description(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} (cuda {torch.version.cuda})"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} torch threads"


def run_metadata(config: dict[str, Any], registry) -> dict[str, Any]:
    import torch

    return {
        "peftmed": __version__, "plugins": plugin_versions(registry), "torch": torch.__version__,
        "transformers": _version("transformers"), "peft": peft_version(), "python": platform.python_version(),
        "platform": platform.platform(), "device": config["device"], "device_name": device_description(config["device"]),
        "git_sha": git_sha(), "seed": config["seed"], "config": config,
    }


# ---- whole-folder files ---------------------------------------------------------------------------
def check_compatible(folder: Path, *, must_exist: bool = True) -> dict[str, Any] | None:
    """Read ``results.json`` and refuse a format this version cannot read (naming both versions)."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        if must_exist:
            raise ResultsError(f"{str(folder)!r} is not a bench results folder (no results.json)")
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ResultsError(f"{path} is not a peftmed bench result (format is not {FORMAT!r})")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        writer = data.get("meta", {}).get("peftmed", "?")
        raise ResultsError(
            f"{path} was written by peftmed {writer} in bench format version {version}; this peftmed reads "
            f"version {FORMAT_VERSION}. Re-run the suite into a new folder (--output)."
        )
    return data


def write_results(folder: Path, meta: dict[str, Any], rows: list[dict[str, Any]],
                  summary: list[dict[str, Any]] | None = None) -> None:
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "meta": meta, "rows": rows, "summary": summary or []}
    write_atomic(folder / "results.json", dumps(data))
    write_atomic(folder / "results.csv", tidy_csv(rows, summary or []))


def tidy_csv(rows: list[dict[str, Any]], summary: list[dict[str, Any]] = ()) -> str:
    """One (recipe, provider, seed, metric, value) row per figure of every job; then the summary over seeds
    (seed ``all``): means, the 95% interval of the primary score, its spread over seeds, paired p-values."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["recipe", "provider", "seed", "metric", "value"])

    def cell(value):
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value

    def text(value):
        """A text cell a spreadsheet shows as text: one starting with = + - @ (a formula) gets a leading '."""
        value = str(value)
        return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value

    for row in rows:
        seed = row.get("seed", 0)
        label = text(row["label"])
        writer.writerow([label, row["provider"], seed, "status", row["status"]])
        if row.get("error"):
            writer.writerow([label, row["provider"], seed, "error", text(row["error"])])
        for metric in figures(row):
            writer.writerow([label, row["provider"], seed, metric, cell(row[metric])])
    for row in summary:
        for metric in figures(row) + [k for k in ("ci_low", "ci_high", "seed_sd", "p_vs_frozen", "p_vs_full",
                                                   "p_vs_best", "forgetting", "forgetting_ci_low", "forgetting_ci_high",
                                                   "p_forgetting") if k in row and k not in figures(row)]:
            writer.writerow([text(row["label"]), row["provider"], "all", metric, cell(row.get(metric))])
    return out.getvalue()


def read_results(folder: str | os.PathLike) -> dict[str, Any]:
    data = check_compatible(Path(folder))
    nullable = {"ci_low", "ci_high", "seed_sd", "p_vs_frozen", "p_vs_full", "p_vs_best", "forgetting",
                "forgetting_ci_low", "forgetting_ci_high", "p_forgetting"}
    for key in ("rows", "summary"):
        data[key] = [{k: (math.nan if v is None and k not in NOT_FIGURES | nullable else v) for k, v in r.items()}
                     for r in data.get(key, [])]
    return data
