"""What the bench shows: the terminal table, plots, the Markdown report, and ``--compare``.

Each recipe is one line: its own figures, then the peftmed/peft ratios (time to the end of the same
budget, and peak memory; below 1 means peftmed is faster / smaller) and peft's accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .results import write_atomic


def echo(text: str) -> None:
    tqdm.write(text)  # prints above any live progress bar instead of through it


def budget_text(config) -> str:
    parts = []
    if config.steps:
        parts.append(f"{config.steps} steps x batch {config.batch_size}")
    if config.time_budget:
        parts.append(f"{config.time_budget:g} s")
    return " or ".join(parts)


def _num(value, fmt: str, width: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    return format(value, fmt).rjust(width)


def _ratio(a, b) -> float:
    try:
        return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan
    except TypeError:
        return math.nan


# (header, width) of the terminal / Markdown table: the bench's own columns, then the task's scores,
# then the peft baseline's ratios and its primary score
BASE_COLUMNS = (("recipe", 24), ("row", 14), ("trainable", 11), ("%", 8), ("peak MiB", 9), ("samples/s", 9),
                ("time s", 7))


def columns(task) -> tuple[tuple[str, int], ...]:
    scores = tuple((c.header, max(6, len(c.header))) for c in task.columns)
    primary = next(c.header for c in task.columns if c.key == task.primary)
    return BASE_COLUMNS + scores + (("peft step x", 11), ("peft mem x", 10), (f"peft {primary}", 6 + len(primary)))


def table_header(task) -> str:
    cols = columns(task)
    head = " ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(cols))
    return head + "\n" + "-" * len(head)


def _cells(rows: Sequence[dict[str, Any]], task) -> tuple[list[str], str]:
    """Table cells of one recipe (its peftmed row and, if any, its peft row), and a note."""
    cols = columns(task)
    own = next(r for r in rows if r["provider"] == "peftmed")
    peft = next((r for r in rows if r["provider"] == "peft"), None)
    cells = [own["label"], str(own.get("row") or "")]
    note = ""
    if own["status"] != "ok":
        cells += [""] * (len(cols) - 2)
        note = f"{own['status'].upper()}: {own.get('error')}"
        return cells, note
    cells += [f"{own['trainable']:,}", f"{own['trainable_percent']:.3f}", _num(own["peak_memory_mib"], ".0f", 0),
              _num(own["throughput"], ".1f", 0), _num(own["train_time_s"], ".1f", 0)]
    cells += [_num(own.get(c.key), c.fmt, 0) for c in task.columns]
    if peft is None:
        cells += ["-", "-", "-"]
        if own.get("peft_note"):
            note = f"peft: {own['peft_note']}"
    elif peft["status"] != "ok":
        cells += ["-", "-", "-"]
        note = f"peft {peft['status']}: {peft.get('error')}"
    else:
        # step time, not wall time: the warm-up steps may include one-time kernel builds
        cells += [_num(_ratio(own["step_time_median_s"], peft["step_time_median_s"]), ".2f", 0),
                  _num(_ratio(own["peak_memory_mib"], peft["peak_memory_mib"]), ".2f", 0),
                  _num(peft.get(task.primary), ".3f", 0)]
    return cells, note


def table_line(rows: Sequence[dict[str, Any]], task) -> str:
    cells, note = _cells(rows, task)
    line = " ".join(c[:w].ljust(w) if i < 2 else c.rjust(w)
                    for i, (c, (_, w)) in enumerate(zip(cells, columns(task))))
    return line + (f"\n    {note[:300]}" if note else "")


def group_rows(rows: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows grouped per recipe label, in suite order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["label"], []).append(r)
    return list(groups.values())


def text_table(rows: Sequence[dict[str, Any]], task) -> str:
    return "\n".join([table_header(task)] + [table_line(g, task) for g in group_rows(rows)])


def markdown_table(rows: Sequence[dict[str, Any]], task) -> str:
    cols = columns(task)
    lines = ["| " + " | ".join(h for h, _ in cols) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|"]
    notes = []
    for group in group_rows(rows):
        cells, note = _cells(group, task)
        cells[0] = cells[0].replace("|", "\\|")
        cells[1] = f"`{cells[1]}`" if cells[1] else ""
        lines.append("| " + " | ".join(c.replace("|", "\\|") if i > 0 else c for i, c in enumerate(cells)) + " |")
        if note:
            notes.append(f"- **{group[0]['label']}**: {note}")
    return "\n".join(lines + ([""] + notes if notes else []))


def winner_text(rows: Sequence[dict[str, Any]], task) -> str:
    """The method with the best primary score per trainable parameter, and the best one."""
    key = task.primary
    name = next(c.header for c in task.columns if c.key == key)

    def value(r):
        v = r.get(key)
        return math.nan if v is None else v

    done = [r for r in rows if r["provider"] == "peftmed" and r["status"] == "ok" and not math.isnan(value(r))]
    ok = [r for r in done if r.get("trainable")]
    if not ok:
        return f"no recipe finished with a {name} figure"
    best = max(ok, key=value)
    # the score gained over the untrained/frozen model per trainable parameter
    floor = min((value(r) for r in done), default=0.0)
    frozen = [r for r in done if r.get("trainable") == 0]
    if frozen:
        floor = value(frozen[0])
    per_param = max(ok, key=lambda r: (value(r) - floor) / r["trainable"])
    return (f"best {name}: {best['label']} ({value(best):.3f}, {best['trainable_percent']:.3f}% trained); best "
            f"{name} per trainable parameter: {per_param['label']} ({value(per_param):.3f} with "
            f"{per_param['trainable']:,} parameters, {per_param['trainable_percent']:.3f}%)")


# ---- plots -------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_all(folder: Path, rows: Sequence[dict[str, Any]], task) -> dict[str, Path]:
    """The primary score vs trainable %, throughput and peak memory per recipe (peft bars beside)."""
    key = task.primary
    name = next(c.header for c in task.columns if c.key == key)
    plt = _pyplot()
    out = folder / "plots"
    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in rows if r["status"] == "ok"]
    paths = {}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for provider, marker, color in (("peftmed", "o", "tab:blue"), ("peft", "s", "tab:orange")):
        pts = [r for r in ok if r["provider"] == provider and not math.isnan(r.get(key, math.nan))]
        if not pts:
            continue
        xs = [max(r["trainable_percent"], 1e-4) for r in pts]  # frozen (0 %) drawn at the axis floor
        ax.scatter(xs, [r[key] for r in pts], marker=marker, color=color, label=provider, zorder=3)
        if provider == "peftmed":
            for x, r in zip(xs, pts):
                ax.annotate(r["label"], (x, r[key]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel(name)
    ax.set_title(f"{name} vs trainable parameters")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths["accuracy"] = out / "accuracy_vs_trainable.png"
    fig.savefig(paths["accuracy"], dpi=110)
    plt.close(fig)

    for key, metric, ylabel, title in (("throughput", "throughput", "samples / s", "Training throughput"),
                                       ("memory", "peak_memory_mib", "peak memory (MiB)", "Peak memory")):
        paths[key] = _bars(plt, out / f"{key}.png", ok, metric, ylabel, title)
    return paths


def _bars(plt, path: Path, rows, metric: str, ylabel: str, title: str) -> Path:
    labels = [g[0]["label"] for g in group_rows(rows) if g[0]["provider"] == "peftmed"]
    value = {(r["label"], r["provider"]): r.get(metric, math.nan) for r in rows}
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(labels) + 2), 4.5))
    xs = range(len(labels))
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [value.get((lab, "peftmed"), math.nan) for lab in labels], width,
           label="peftmed", color="tab:blue")
    ax.bar([x + width / 2 for x in xs], [value.get((lab, "peft"), math.nan) for lab in labels], width,
           label="peft", color="tab:orange")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the Markdown report -----------------------------------------------------------------------------
def write_report(folder: Path, data: dict[str, Any], task) -> Path:
    meta, rows = data["meta"], data["rows"]
    plots = plot_all(folder, rows, task)
    primary = next(c.header for c in task.columns if c.key == task.primary)
    cfg = meta.get("config", {})
    memory = next((r.get("memory_method") for r in rows if r.get("memory_method")), "n/a")
    lines = [
        f"# peftmed bench: {cfg.get('backbone')} on {cfg.get('dataset')} ({task.name})",
        "",
        f"- suite `{meta.get('suite')}`, {len({r['label'] for r in rows})} recipes; budget "
        f"{cfg.get('steps') or '-'} steps / {cfg.get('time_budget') or '-'} s at batch {cfg.get('batch_size')}; "
        f"seed {meta.get('seed')}",
        f"- device: {meta.get('device_name')}",
        f"- versions: peftmed {meta.get('peftmed')}, torch {meta.get('torch')}, transformers "
        f"{meta.get('transformers')}, peft {meta.get('peft')}; git {meta.get('git_sha')}",
        f"- peak memory: {memory}",
        "- throughput: median of timed training steps after warm-up; time: wall time to the end of the budget",
        "- peft step x / mem x: peftmed / peft median step time and peak memory on the same model, seed and "
        "budget (below 1: peftmed faster / smaller); peft overall: peft's ACC",
        f"- elapsed: {meta.get('elapsed_s', math.nan):.0f} s",
        "",
        markdown_table(rows, task),
        "",
        winner_text(rows, task),
        "",
        f"![{primary} vs trainable parameters](plots/{plots['accuracy'].name})",
        "",
        f"![throughput](plots/{plots['throughput'].name})",
        "",
        f"![peak memory](plots/{plots['memory'].name})",
        "",
    ]
    path = folder / "report.md"
    write_atomic(path, "\n".join(lines))
    return path


# ---- compare -----------------------------------------------------------------------------------------
def compare_text(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str, task) -> str:
    """Two results folders side by side: per recipe (peftmed rows), A's and B's key figures."""
    primary = next(c for c in task.columns if c.key == task.primary)
    figures = ((primary.header, primary.key, primary.fmt), ("samples/s", "throughput", ".1f"),
               ("peak MiB", "peak_memory_mib", ".0f"), ("time s", "train_time_s", ".1f"))
    rows_a = {r["label"]: r for r in a["rows"] if r["provider"] == "peftmed"}
    rows_b = {r["label"]: r for r in b["rows"] if r["provider"] == "peftmed"}
    labels = list(rows_a) + [k for k in rows_b if k not in rows_a]
    head = f"{'recipe':<24}" + "".join(f" {h + ' A':>12} {h + ' B':>12} {'B/A':>6}" for h, _, _ in figures)
    lines = [f"A = {name_a} ({_describe(a)})", f"B = {name_b} ({_describe(b)})", "", head, "-" * len(head)]
    for label in labels:
        ra, rb = rows_a.get(label, {}), rows_b.get(label, {})
        line = f"{label[:24]:<24}"
        for _, key, fmt in figures:
            va, vb = ra.get(key, math.nan), rb.get(key, math.nan)
            va = math.nan if va is None or ra.get("status") != "ok" else va
            vb = math.nan if vb is None or rb.get("status") != "ok" else vb
            line += f" {_num(va, fmt, 12)} {_num(vb, fmt, 12)} {_num(_ratio(vb, va), '.2f', 6)}"
        lines.append(line)
    return "\n".join(lines)


def _describe(data: dict[str, Any]) -> str:
    meta = data["meta"]
    cfg = meta.get("config", {})
    return (f"{cfg.get('backbone')} / {cfg.get('dataset')}, {meta.get('device_name')}, seed {meta.get('seed')}, "
            f"peftmed {meta.get('peftmed')}, git {meta.get('git_sha')}")
