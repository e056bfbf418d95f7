"""``report.html``: the bench's results as one self-contained page (no server, no network).

- a sortable, filterable table of every recipe and provider (every figure the results hold: scores with their
  95% intervals, spread over seeds, paired p-values, trainable parameters, memory, throughput, time);
- an interactive plot of the primary score against trainable parameters (log axis; frozen, with none, at the
  axis' left end), intervals as error bars, the Pareto front (no recipe scores higher with fewer trainable
  parameters) marked, the peft baseline with its own markers;
- throughput and peak-memory bars, peftmed and peft side by side;
- the run's metadata (versions, device, budget, seeds, kernel builds).

The charts are plotly's (its JavaScript inlined once); the table's sorting and filtering is a few lines of
plain JavaScript. ``compare_html`` draws two results folders on the same page (a ``run`` column, one colour per
run).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path

from ..files import write_text_atomic
from .summary import winner

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")

# table columns: (key, header, format); the task's score columns go after "row"
HEAD_COLUMNS = (("run", "run", None), ("label", "recipe", None), ("provider", "provider", None), ("row", "row", None))
TAIL_COLUMNS = (("ci_low", "95% CI low", ".3f"), ("ci_high", "95% CI high", ".3f"), ("seed_sd", "seed sd", ".3f"),
                ("p_vs_frozen", "p vs frozen", ".3g"), ("p_vs_full", "p vs full", ".3g"),
                ("trainable", "trainable", ",d"), ("trainable_percent", "trainable %", ".3f"),
                ("total_params", "parameters", ",d"), ("peak_memory_mib", "peak MiB", ".0f"),
                ("throughput", "samples/s", ".1f"), ("step_time_median_s", "step s", ".3f"),
                ("train_time_s", "train s", ".1f"), ("eval_time_s", "eval s", ".1f"), ("final_loss", "final loss", ".3f"),
                ("n_seeds", "seeds", "d"), ("status", "status", None))

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:28px}
table{border-collapse:collapse;font-size:13px}th,td{padding:4px 8px;border-bottom:1px solid #ddd;text-align:right}
th{cursor:pointer;background:#f4f4f4;position:sticky;top:0;user-select:none}th.sorted-asc:after{content:" \\25B2"}
th.sorted-desc:after{content:" \\25BC"}td.text,th.text{text-align:left}tr.peft td{color:#666}
#filter{margin:8px 0;padding:4px;width:320px}dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;
font-size:13px}dt{font-weight:600}.summary{font-weight:600;margin:12px 0}
"""

SCRIPT = """
(function(){
  const table=document.getElementById('results');
  const body=table.tBodies[0];
  const heads=[...table.tHead.rows[0].cells];
  heads.forEach((th,i)=>th.addEventListener('click',()=>{
    const asc=!th.classList.contains('sorted-asc');
    heads.forEach(h=>h.classList.remove('sorted-asc','sorted-desc'));
    th.classList.add(asc?'sorted-asc':'sorted-desc');
    const rows=[...body.rows];
    const key=r=>{const c=r.cells[i];const v=c.dataset.value;
      return v!==undefined&&v!==''&&!isNaN(Number(v))?Number(v):c.textContent.trim().toLowerCase();};
    rows.sort((a,b)=>{const x=key(a),y=key(b);
      if(typeof x==='number'&&typeof y==='number')return asc?x-y:y-x;
      if(typeof x==='number')return -1;if(typeof y==='number')return 1;
      return asc?String(x).localeCompare(String(y)):String(y).localeCompare(String(x));});
    rows.forEach(r=>body.appendChild(r));
  }));
  document.getElementById('filter').addEventListener('input',e=>{
    const q=e.target.value.toLowerCase();
    [...body.rows].forEach(r=>{r.style.display=r.textContent.toLowerCase().includes(q)?'':'none';});
  });
})();
"""


def script_json(data) -> str:
    """JSON that can stand inside a <script> element and still parses: HTML escaping (&lt;) would break
    JSON.parse, so the characters that could end the element or open a comment are written as JSON's own
    \\u escapes, which JSON.parse turns back into the characters."""
    text = json.dumps(data, default=str)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e") \
        .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
        return None
    return float(value)


def _cell(value, fmt: str | None) -> tuple[str, str]:
    """(text, sort value) of a table cell."""
    number = _number(value)
    if number is None:
        return ("-" if value is None or isinstance(value, float) else str(value)), ""
    if fmt is None:
        return str(value), repr(number)
    if fmt.endswith("d"):
        return format(int(number), fmt), repr(number)
    return format(number, fmt), repr(number)


def _columns(task) -> list[tuple[str, str, str | None]]:
    scores = [(c.key, c.header, c.fmt) for c in task.columns]
    return list(HEAD_COLUMNS) + scores + list(TAIL_COLUMNS)


def _rows(runs: Sequence[tuple[str, dict]]) -> list[dict]:
    out = []
    for name, data in runs:
        for row in data.get("summary") or data["rows"]:
            out.append({**row, "run": name})
    return out


def _table(rows: list[dict], task, show_run: bool) -> str:
    cols = [c for c in _columns(task) if show_run or c[0] != "run"]
    head = "".join(f'<th class="{"text" if fmt is None else "num"}" data-key="{key}">{html.escape(title)}</th>'
                   for key, title, fmt in cols)
    body = []
    for row in rows:
        cells = []
        for key, _, fmt in cols:
            text, value = _cell(row.get(key), fmt)
            cls = "text" if fmt is None else "num"
            cells.append(f'<td class="{cls}" data-value="{html.escape(value)}">{html.escape(text)}</td>')
        body.append(f'<tr class="{html.escape(row.get("provider", ""))}">{"".join(cells)}</tr>')
    return (f'<input id="filter" placeholder="filter rows (recipe, provider, status...)" aria-label="filter">'
            f'<table id="results"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')


def pareto(points: Sequence[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats with as few or fewer trainable parameters: (params, score, label)."""
    front, best = [], -math.inf
    for x, y, label in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y, label))
            best = y
    return front


def _score_figure(runs, task):
    import plotly.graph_objects as go

    primary = next(c for c in task.columns if c.key == task.primary)
    fig = go.Figure()
    for r, (name, data) in enumerate(runs):
        rows = [x for x in (data.get("summary") or data["rows"]) if x.get("status") == "ok"]
        for provider, symbol in (("peftmed", "circle"), ("peft", "diamond-open")):
            chosen = [x for x in rows if x["provider"] == provider and _number(x.get(task.primary)) is not None]
            if not chosen:
                continue
            # peft's points sit at the same parameter counts: drawn 12% to the right (hover says the true count)
            shift = 1.0 if provider == "peftmed" else 1.12
            xs = [max(float(x.get("trainable") or 0), 1.0) * shift for x in chosen]
            ys = [float(x[task.primary]) for x in chosen]
            hi = [max((_number(x.get("ci_high")) or y) - y, 0) for x, y in zip(chosen, ys)]
            lo = [max(y - (_number(x.get("ci_low")) or y), 0) for x, y in zip(chosen, ys)]
            text = [f"{x['label']}<br>{int(x.get('trainable') or 0):,} trainable" for x in chosen]
            fig.add_trace(go.Scatter(
                x=xs, y=ys, mode="markers+text" if provider == "peftmed" else "markers",
                text=[x["label"] for x in chosen] if provider == "peftmed" else None, textposition="top center",
                hovertext=text, hoverinfo="text+y", name=f"{name}: {provider}" if len(runs) > 1 else provider,
                marker=dict(symbol=symbol, size=10, color=COLORS[r % len(COLORS)], line=dict(width=2)),
                error_y=dict(type="data", array=hi, arrayminus=lo, visible=True)))
        own = [(max(float(x.get("trainable") or 0), 1.0), float(x[task.primary]), x["label"]) for x in rows
               if x["provider"] == "peftmed" and _number(x.get(task.primary)) is not None]
        front = pareto(own)
        if front:
            fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[p[1] for p in front], mode="lines+markers" if len(front) == 1 else "lines",
                                     line=dict(shape="hv", dash="dot", color=COLORS[r % len(COLORS)]),
                                     name=f"{name}: Pareto front" if len(runs) > 1 else "Pareto front",
                                     hoverinfo="skip"))
    fig.update_layout(title=f"{primary.header} vs trainable parameters (95% intervals; frozen drawn at 1)",
                      xaxis=dict(type="log", title="trainable parameters"), yaxis=dict(title=primary.header),
                      height=520, margin=dict(t=60, l=60, r=20, b=60))
    return fig


def _bar_figure(runs, key: str, title: str, ylabel: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    for r, (name, data) in enumerate(runs):
        rows = [x for x in (data.get("summary") or data["rows"]) if x.get("status") == "ok" and _number(x.get(key))]
        for provider, pattern in (("peftmed", ""), ("peft", "/")):
            chosen = [x for x in rows if x["provider"] == provider]
            if chosen:
                fig.add_trace(go.Bar(x=[x["label"] for x in chosen], y=[float(x[key]) for x in chosen],
                                     name=f"{name}: {provider}" if len(runs) > 1 else provider,
                                     marker=dict(color=COLORS[r % len(COLORS)], pattern_shape=pattern,
                                                 opacity=1.0 if provider == "peftmed" else 0.55)))
    fig.update_layout(title=title, barmode="group", yaxis=dict(title=ylabel), height=420,
                      margin=dict(t=60, l=60, r=20, b=120))
    return fig


def _meta(name: str, data: dict) -> str:
    meta = data.get("meta", {})
    cfg = meta.get("config", {})
    items = {
        "backbone / dataset / task": f"{cfg.get('backbone')} / {cfg.get('dataset')} / {cfg.get('task') or '-'}",
        "suite": meta.get("suite"), "device": meta.get("device_name"),
        "budget": f"{cfg.get('steps') or '-'} steps, {cfg.get('time_budget') or '-'} s, batch {cfg.get('batch_size')}",
        "seeds": ", ".join(map(str, cfg.get("seeds") or [cfg.get("seed")])),
        "versions": f"peftmed {meta.get('peftmed')}, torch {meta.get('torch')}, transformers {meta.get('transformers')}, "
                    f"peft {meta.get('peft')}, python {meta.get('python')}",
        "git": meta.get("git_sha"), "started / finished": f"{meta.get('started')} / {meta.get('finished')}",
        "elapsed": f"{meta.get('elapsed_s', 0):.0f} s" if _number(meta.get("elapsed_s")) is not None else "-",
        "kernel builds": ", ".join(f"{b.get('extension')} {b.get('seconds', 0):.0f} s" for b in
                                   meta.get("kernel_builds") or [] if b.get("built")) or "none needed",
    }
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items.items())
    return f"<h2>Run {html.escape(name)}</h2><dl>{rows}</dl>"


def html_document(runs: Sequence[tuple[str, dict]], task, title: str) -> str:
    """The page for one results folder, or several side by side."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs


    figures = [_score_figure(runs, task),
               _bar_figure(runs, "throughput", "Training throughput (median step, after warm-up)", "samples/s"),
               _bar_figure(runs, "peak_memory_mib", "Peak memory of a training run", "MiB")]
    charts = "".join(pio.to_html(fig, full_html=False, include_plotlyjs=False, config={"displaylogo": False},
                                 div_id=f"chart-{i}") for i, fig in enumerate(figures))
    summaries = "".join(f'<p class="summary">{html.escape(name + ": " if len(runs) > 1 else "")}'
                        f'{html.escape(winner(data.get("summary") or [], task)["text"])}</p>'
                        for name, data in runs if data.get("summary"))
    doc = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{STYLE}</style>",
        f"<script>{get_plotlyjs()}</script></head><body>",
        f"<h1>{html.escape(title)}</h1>", summaries,
        "<h2>Results</h2>", _table(_rows(runs), task, show_run=len(runs) > 1),
        "<h2>Charts</h2>", charts,
        "".join(_meta(name, data) for name, data in runs),
        f"<script>{SCRIPT}</script>",
        f"<script type='application/json' id='results-data'>{script_json(_rows(runs))}</script>",
        "</body></html>",
    ]
    return "\n".join(doc)


def write_html(folder: str | Path, data: dict, task) -> Path:
    cfg = data.get("meta", {}).get("config", {})
    title = f"peftmed bench: {cfg.get('backbone')} on {cfg.get('dataset')} ({task.name})"
    path = Path(folder) / "report.html"
    write_text_atomic(path, html_document([(Path(folder).name or "run", data)], task, title))
    return path


def compare_html(path: str | Path, a: dict, b: dict, name_a: str, name_b: str, task) -> Path:
    path = Path(path)
    title = f"peftmed bench: {name_a} vs {name_b} ({task.name})"
    write_text_atomic(path, html_document([(name_a, a), (name_b, b)], task, title))
    return path
