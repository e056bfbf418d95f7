"""``peftmed bench --suite irg``: the LayerNorm paper's method comparison on report generation.

The bench's own runner does the work (one fresh process per recipe, the same seed, data order and
budget for every recipe, peak memory and step time measured the same way); for report records its
task layer (``peftmed.bench.task``) wraps the adapted model in ``ReportModel``, batches reports and
scores generated reports with ``report_scores``. This module adds the report defaults and the
report table: BLEU-4, ROUGE-L, CIDEr, findings F1 (phantom), trainable %, samples/s, peak memory.

Defaults for reports: the ``phantom-report`` dataset, generation of up to 100 tokens (greedy unless
``--num-beams``), the first 64 test images, and miss-tiny built with 128 text positions (its 64 would
clip the phantom reports, which run to about 95 word pieces).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError

# Builder options a backbone needs to hold a whole report (given unless the user sets them).
REPORT_BACKBONE_OPTIONS = {"miss-tiny": {"max_position_embeddings": 128}}
SCORE_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "meteor", "cider", "findings_f1",
              "presence_acc")
COLUMNS = (("recipe", 12), ("trainable", 10), ("%", 8), ("BLEU-4", 7), ("ROUGE-L", 7), ("CIDEr", 6),
           ("METEOR", 6), ("find F1", 7), ("samples/s", 9), ("peak MiB", 8), ("status", 6))


def evaluate_reports_job(model, records, job, dataset) -> dict[str, Any]:
    """A bench job's evaluation on report records: every score as a float, plus the predictions."""
    from .commands import report_tokens
    from .evaluate import evaluate_reports

    result = evaluate_reports(model, records, batch_size=job.eval_batch_size, num_beams=job.num_beams,
                              max_new_tokens=report_tokens(job.max_new_tokens), dataset=dataset,
                              progress=job.progress)
    out = {k: (math.nan if result.scores.get(k) is None else float(result.scores[k])) for k in SCORE_KEYS}
    # the bench's Med-VQA columns stay empty (NaN) for reports: there is no accuracy to show
    out.update(acc_closed=math.nan, acc_open=math.nan, acc_overall=math.nan)
    out["metrics_version"] = result.scores["metrics_version"]
    out["predictions"] = dict(result.predictions)
    return out


def run_report_bench(config, registry=None, echo=None) -> dict[str, Any]:
    """``peftmed.bench.run_bench`` on a report dataset, then the report table (also in ``irg.md``)."""
    from ..bench import report as bench_report
    from ..bench.runner import default_output, run_bench
    from ..bench.task import registry_with

    registry = registry or registry_with(config.plugins)
    echo = echo or bench_report.echo
    spec = registry.get("dataset", config.dataset)
    if getattr(spec, "task", "vqa") != "report":
        raise ConfigError(f"the report suite needs a report dataset (phantom-report, iu-xray, mimic-cxr); "
                          f"{config.dataset!r} is a {spec.task} dataset")
    for key, value in REPORT_BACKBONE_OPTIONS.get(config.backbone, {}).items():
        config.backbone_options.setdefault(key, value)
    config.output = config.output or default_output()  # the report table goes beside the results
    data = run_bench(config, registry, echo)
    text = table(data["rows"])
    echo("\nreport generation (" + config.dataset + "):\n" + text)
    folder = Path(config.output)
    (folder / "irg.md").write_text(markdown(data) + "\n")
    echo(f"wrote {folder / 'irg.md'}")
    return data


def _cells(row: dict[str, Any]) -> list[str]:
    def num(key, fmt):
        v = row.get(key)
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    if row["status"] != "ok":
        return [row["label"]] + [""] * (len(COLUMNS) - 2) + [row["status"]]
    return [row["label"], f"{row['trainable']:,}", f"{row['trainable_percent']:.3f}", num("bleu_4", ".3f"),
            num("rouge_l", ".3f"), num("cider", ".3f"), num("meteor", ".3f"), num("findings_f1", ".3f"),
            num("throughput", ".1f"), num("peak_memory_mib", ".0f"), "ok"]


def _own(rows):
    return [r for r in rows if r.get("provider") == "peftmed"]


def table(rows) -> str:
    head = " ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(COLUMNS))
    lines = [head, "-" * len(head)]
    for r in _own(rows):
        lines.append(" ".join(c[:w].ljust(w) if i == 0 else c.rjust(w)
                              for i, (c, (_, w)) in enumerate(zip(_cells(r), COLUMNS))))
    return "\n".join(lines)


def markdown(data: dict[str, Any]) -> str:
    meta, rows = data["meta"], _own(data["rows"])
    cfg = meta.get("config", {})
    version = next((r.get("metrics_version") for r in rows if r.get("metrics_version")), "")
    lines = [f"# peftmed bench --suite irg: {cfg.get('backbone')} on {cfg.get('dataset')}", "",
             f"- budget {cfg.get('steps') or '-'} steps / {cfg.get('time_budget') or '-'} s at batch "
             f"{cfg.get('batch_size')}, seed {cfg.get('seed')}; {cfg.get('eval_samples')} test reports, "
             f"beams {cfg.get('num_beams')}; device {meta.get('device_name')}",
             f"- metrics: {version}", "",
             "| " + " | ".join(h for h, _ in COLUMNS) + " |", "|---" + "|---:" * (len(COLUMNS) - 1) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    failed = [f"- **{r['label']}**: {r.get('error')}" for r in rows if r["status"] != "ok"]
    return "\n".join(lines + ([""] + failed if failed else []))
