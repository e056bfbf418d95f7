"""What the bench shows: the terminal table, plots, the Markdown report, and ``--compare``.

Each recipe is one line: its own figures, then the peftmed/peft ratios (time to the end of the same
budget, and peak memory; below 1 means peftmed is faster / smaller) and peft's accuracy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .html import write_html
from .results import write_atomic
from .summary import efficiency, winner


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


STAT_COLUMNS = (("95% CI", 13), ("seed sd", 7), ("> frozen", 8), ("p vs frozen", 11), ("p vs full", 9),
                ("forgetting", 10), ("p forget", 8))


def columns(task, stats: bool = False) -> tuple[tuple[str, int], ...]:
    """The table's (header, width): the bench's own columns, the task's scores (with ``stats``: the primary
    score's interval, its spread over seeds and the paired p-values), the peft baseline's ratios."""
    scores = tuple((c.header, max(6, len(c.header))) for c in task.columns)
    primary = next(c.header for c in task.columns if c.key == task.primary)
    return BASE_COLUMNS + scores + (STAT_COLUMNS if stats else ()) + (
        ("peft step x", 11), ("peft mem x", 10), (f"peft {primary}", 6 + len(primary)))


def table_header(task, stats: bool = False) -> str:
    cols = columns(task, stats)
    head = " ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(cols))
    return head + "\n" + "-" * len(head)


def _p(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _cells(rows: Sequence[dict[str, Any]], task, stats: bool = False) -> tuple[list[str], str]:
    """Table cells of one recipe (its peftmed row and, if any, its peft row), and a note."""
    cols = columns(task, stats)
    own = next(r for r in rows if r["provider"] == "peftmed")
    peft = next((r for r in rows if r["provider"] == "peft"), None)
    cells = [own["label"], str(own.get("row") or "")]
    note = ""
    if own["status"] != "ok":
        cells += [""] * (len(cols) - 2)
        note = f"{own['status'].upper()}: {own.get('error')}"
        return cells, note
    cells += [f"{int(own['trainable']):,}", f"{own['trainable_percent']:.3f}", _num(own["peak_memory_mib"], ".0f", 0),
              _num(own["throughput"], ".1f", 0), _num(own["train_time_s"], ".1f", 0)]
    cells += [_num(own.get(c.key), c.fmt, 0) for c in task.columns]
    if stats:
        lo, hi = own.get("ci_low"), own.get("ci_high")
        has_ci = lo is not None and not (isinstance(lo, float) and math.isnan(lo))
        seeds = own.get("seeds_above_frozen")
        cells += [f"{lo:.3f}-{hi:.3f}" if has_ci else "-", _num(own.get("seed_sd"), ".3f", 0),
                  f"{seeds[0]}/{seeds[1]}" if seeds else "-", _p(own.get("p_vs_frozen")), _p(own.get("p_vs_full")),
                  _num(own.get("forgetting"), "+.3f", 0), _p(own.get("p_forgetting"))]
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


def table_line(rows: Sequence[dict[str, Any]], task, stats: bool = False) -> str:
    cells, note = _cells(rows, task, stats)
    line = " ".join(c[:w].ljust(w) if i < 2 else c.rjust(w)
                    for i, (c, (_, w)) in enumerate(zip(cells, columns(task, stats))))
    return line + (f"\n    {note[:300]}" if note else "")


def group_rows(rows: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows grouped per recipe label, in suite order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["label"], []).append(r)
    return list(groups.values())


def text_table(summary: Sequence[dict[str, Any]], task) -> str:
    """The summary table (one line per recipe, statistics included)."""
    return "\n".join([table_header(task, True)] + [table_line(g, task, True) for g in group_rows(summary)])


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+!|~])")


def md_text(text: str) -> str:
    """A label as literal Markdown text: every character Markdown (or the HTML inside it) could read as markup
    is backslash-escaped, line breaks become spaces."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def markdown_table(summary: Sequence[dict[str, Any]], task) -> str:
    cols = columns(task, True)
    lines = ["| " + " | ".join(h for h, _ in cols) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|"]
    notes = []
    for group in group_rows(summary):
        cells, note = _cells(group, task, True)
        cells[0] = md_text(cells[0])
        cells[1] = f"`{cells[1]}`" if cells[1] else ""
        lines.append("| " + " | ".join(c.replace("|", "\\|") if i > 0 else c for i, c in enumerate(cells)) + " |")
        if note:
            notes.append(f"- **{md_text(group[0]['label'])}**: {md_text(note)}")
    return "\n".join(lines + ([""] + notes if notes else []))


# ---- plots -------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_all(folder: Path, summary: Sequence[dict[str, Any]], task) -> dict[str, Path]:
    """The primary score (with its 95% interval) vs trainable parameters, throughput and peak memory per
    recipe (peft beside)."""
    plt = _pyplot()
    out = folder / "plots"
    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in summary if r["status"] == "ok"]
    paths = {"accuracy": _score_plot(plt, out / "accuracy_vs_trainable.png", ok, task)}
    for key, metric, ylabel, title in (("throughput", "throughput", "samples / s", "Training throughput"),
                                       ("memory", "peak_memory_mib", "peak memory (MiB)", "Peak memory")):
        paths[key] = _bars(plt, out / f"{key}.png", ok, metric, ylabel, title)
    return paths


def _spread_labels(points: list[tuple[float, float, str]], min_gap: float) -> list[float]:
    """y positions for labels so that no two closer than ``min_gap`` overlap (in y order)."""
    order = sorted(range(len(points)), key=lambda i: points[i][1])
    placed: list[float] = [0.0] * len(points)
    last = -math.inf
    for i in order:
        y = max(points[i][1], last + min_gap)
        placed[i], last = y, y
    return placed


def _score_plot(plt, path: Path, rows, task) -> Path:
    key = task.primary
    name = next(c.header for c in task.columns if c.key == key)
    fig, ax = plt.subplots(figsize=(8, 5))
    # frozen trains 0 parameters: a symmetric log axis has a linear stretch around 0 where it sits honestly
    ax.set_xscale("symlog", linthresh=1e-3)
    styles = {"peftmed": ("o", "tab:blue", 1.0), "peft": ("s", "tab:orange", 1.15)}  # peft drawn a bit right
    label_points = []
    for provider, (marker, color, shift) in styles.items():
        pts = [r for r in rows if r["provider"] == provider and not math.isnan(r.get(key, math.nan))]
        if not pts:
            continue
        xs = [r["trainable_percent"] * shift for r in pts]
        ys = [r[key] for r in pts]
        lo = [r[key] - r["ci_low"] if _has(r.get("ci_low")) else 0.0 for r in pts]
        hi = [r["ci_high"] - r[key] if _has(r.get("ci_high")) else 0.0 for r in pts]
        label = "peftmed (95% CI)" if provider == "peftmed" else \
            f"peft (95% CI; drawn {100 * (shift - 1):.0f}% right of its recipe's point)"
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt=marker, color=color, ecolor=color, elinewidth=1, capsize=3,
                    markersize=6 if provider == "peftmed" else 7, markerfacecolor=color if provider == "peftmed"
                    else "none", label=label, zorder=3)
        if provider == "peftmed":
            label_points += [(x, y, r["label"]) for x, y, r in zip(xs, ys, pts)]
    ylo, yhi = ax.get_ylim()
    placed = _spread_labels(label_points, (yhi - ylo) * 0.045)
    for (x, y, text), ly in zip(label_points, placed):
        # beside the point (a few points to its right, on a white box), never on the markers
        ax.annotate(text, (x, y), xytext=(10, (ly - y) / (yhi - ylo) * 300), textcoords="offset points", fontsize=7,
                    ha="left", va="center", xycoords="data", zorder=4,
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"})
    ax.set_xlim(left=-5e-4)
    ax.set_xlabel("trainable parameters (% of the model; linear below 0.001%, log above; frozen at 0)")
    ax.set_ylabel(name)
    ax.set_title(f"{name} vs trainable parameters")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _has(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _bars(plt, path: Path, rows, metric: str, ylabel: str, title: str) -> Path:
    """peftmed's and peft's bars per recipe, with the spread over seeds as error bars; "n/a" where a provider has
    no figure (peft without the method, a recipe that trains nothing); the legend above the plot."""
    labels = [g[0]["label"] for g in group_rows(rows) if g[0]["provider"] == "peftmed"]
    value = {(r["label"], r["provider"]): r.get(metric, math.nan) for r in rows}
    spread = {(r["label"], r["provider"]): r.get(f"{metric}_sd") for r in rows}
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(labels) + 2), 4.8))
    xs = list(range(len(labels)))
    width = 0.4
    top = max([v for v in value.values() if _has(v)] or [1.0])
    for provider, offset, color in (("peftmed", -width / 2, "tab:blue"), ("peft", width / 2, "tab:orange")):
        heights = [value.get((lab, provider), math.nan) for lab in labels]
        errors = [spread.get((lab, provider)) or 0.0 for lab in labels]
        errors = [e if _has(e) else 0.0 for e in errors]
        ax.bar([x + offset for x in xs], [h if _has(h) else 0.0 for h in heights], width, label=provider, color=color,
               yerr=errors if any(errors) else None, capsize=3, error_kw={"elinewidth": 1})
        for x, h in zip(xs, heights):
            if not _has(h):
                ax.text(x + offset, top * 0.02, "n/a", ha="center", va="bottom", fontsize=7, color="0.35",
                        rotation=90)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, pad=22)
    ax.set_ylim(0, top * 1.12)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the Markdown report -----------------------------------------------------------------------------
def write_report(folder: Path, data: dict[str, Any], task) -> Path:
    meta, rows, summary = data["meta"], data["rows"], data.get("summary") or []
    plots = plot_all(folder, summary, task)
    primary = next(c.header for c in task.columns if c.key == task.primary)
    cfg = meta.get("config", {})
    memory = next((r.get("memory_method") for r in rows if r.get("memory_method")), "n/a")
    seeds = cfg.get("seeds") or [cfg.get("seed")]
    builds = [b for b in meta.get("kernel_builds") or [] if b.get("built")]
    n_test = next((r.get("n_test") for r in rows if r.get("n_test")), None)
    lines = [
        f"# peftmed bench: {cfg.get('backbone')} on {cfg.get('dataset')} ({task.name})",
        "",
        f"- suite `{meta.get('suite')}`, {len({r['label'] for r in rows})} recipes; budget "
        f"{cfg.get('steps') or '-'} steps / {cfg.get('time_budget') or '-'} s at batch {cfg.get('batch_size')}; "
        f"seed(s) {', '.join(map(str, seeds))}; {n_test} test records",
        f"- device: {meta.get('device_name')}",
        f"- versions: peftmed {meta.get('peftmed')}, torch {meta.get('torch')}, transformers "
        f"{meta.get('transformers')}, peft {meta.get('peft')}; git {meta.get('git_sha')}",
        f"- peak memory: {memory}",
        "- throughput: median of timed training steps after warm-up; time: training time to the end of the budget",
        "- kernels: " + (", ".join(f"{b['extension']} compiled in {b['seconds']:.0f} s" for b in builds)
                         + " before any timing" if builds else "no extension needed compiling (loaded from the cache)"),
        f"- {primary} with its 95% bootstrap interval over the test records (each record's score averaged over the "
        f"seeds); seed sd: spread over seeds; > frozen: the seeds on which the recipe beats frozen; p vs frozen / full: "
        f"paired two-sided test on the same records, the records as units "
        f"({'McNemar exact with one seed, else ' if task.binary else ''}a sign-flip permutation test)",
        f"- jobs: {meta.get('workers', 1)} at a time, {meta.get('threads') or 'default'} torch thread(s) each; load "
        f"average {meta.get('load_average_start')} at the start, {meta.get('load_average_end')} at the end (the bench's "
        f"own jobs included); other work used {_cores(meta.get('other_work_cores'))} on average",
        "- forgetting (transfer protocol): the recipe's score on the source domain after adapting, minus the source "
        "model's (frozen), with a paired test on the source domain's records" if meta.get("forgetting") else "",
        "- peft step x / mem x: peftmed / peft median step time and peak memory on the same model, seed and "
        f"budget (below 1: peftmed faster / smaller); peft {primary}: peft's score",
        f"- elapsed: {meta.get('elapsed_s', math.nan):.0f} s",
        "",
        markdown_table(summary, task),
        "",
        "**" + winner(summary, task)["text"] + "**",
        "",
        efficiency(summary, task),
        "",
        *([meta["forgetting"].replace("\n", "\n\n"), ""] if meta.get("forgetting") else []),
        *([meta["answers"], ""] if meta.get("answers") else []),
        *([f"**{meta['load_warning']}**", ""] if meta.get("load_warning") else []),
        f"![{primary} vs trainable parameters](plots/{plots['accuracy'].name})",
        "",
        f"![throughput](plots/{plots['throughput'].name})",
        "",
        f"![peak memory](plots/{plots['memory'].name})",
        "",
    ]
    try:
        write_html(folder, data, task)  # imports plotly
        lines[1:1] = ["", "Interactive: [report.html](report.html) (sortable table, plots, metadata; one file, no network)"]
    except ImportError:  # plotly is not installed: the Markdown report and its PNG plots only
        echo("report.html needs plotly (pip install plotly); wrote report.md only")
    path = folder / "report.md"
    write_atomic(path, "\n".join(lines))
    return path


# ---- compare -----------------------------------------------------------------------------------------
def compare_text(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str, task) -> str:
    """Two results folders side by side: per recipe (peftmed rows), A's and B's key figures."""
    primary = next(c for c in task.columns if c.key == task.primary)
    figures = ((primary.header, primary.key, primary.fmt), ("samples/s", "throughput", ".1f"),
               ("peak MiB", "peak_memory_mib", ".0f"), ("time s", "train_time_s", ".1f"))
    rows_a = {r["label"]: r for r in a.get("summary") or a["rows"] if r["provider"] == "peftmed"}
    rows_b = {r["label"]: r for r in b.get("summary") or b["rows"] if r["provider"] == "peftmed"}
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


def _cores(value) -> str:
    return "an unknown share of the cores (not measured on this platform)" if value is None else f"{value:.2f} cores"
