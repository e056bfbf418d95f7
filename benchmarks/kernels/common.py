"""Shared timing and reporting for the kernel benchmarks.

Candidates and baselines are timed interleaved (one call of each per round, many rounds) so that a
noisy, shared machine slows all of them alike; the figures are the 20th/50th/80th percentiles. On a GPU
each call is timed with CUDA events after the L2 cache is flushed (a 256 MB buffer zeroed, as
``triton.testing.do_bench`` does), so no call reads what the previous one left in L2; on a CPU with
``perf_counter``.

``target()`` records a target's figure beside its goal; ``--targets-json`` in each benchmark writes them for
``benchmarks/gpu_check.sh``'s met / not met table.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], None]], *, device: str, rounds: int, warmup: int = 5
                     ) -> dict[str, list[float]]:
    """Milliseconds per call of each function, measured round-robin (CUDA events and an L2 flush on a GPU)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    if device == "cuda":
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
        for _ in range(rounds):
            events = []
            for name, fn in fns.items():
                flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events.append((name, start, end))
            torch.cuda.synchronize()
            for name, start, end in events:
                times[name].append(start.elapsed_time(end))
        return times
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


TARGETS: list[dict] = []


_STREAMED: set[int] = set()  # TARGETS already appended to $PEFTMED_TARGETS_JSON


def _append(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(path.read_text()) if path.exists() else []
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(previous + records, indent=2))
    tmp.replace(path)  # a benchmark killed mid-write leaves the previous file whole


def target(name: str, figure: float, goal: str, met: bool, unit: str = "") -> None:
    """Record one target's measured figure (and print it). With $PEFTMED_TARGETS_JSON set (the GPU check sets it)
    it is written there at once: a benchmark killed by its timeout later loses none it measured."""
    record = {"target": name, "figure": f"{figure:.3g}{unit}", "goal": goal, "met": bool(met)}
    TARGETS.append(record)
    print(f"target: {name}: {figure:.3g}{unit} (goal {goal}) -> {'met' if met else 'NOT MET'}", flush=True)
    stream = os.environ.get("PEFTMED_TARGETS_JSON")
    if stream:
        _append(Path(stream), [record])
        _STREAMED.add(id(record))


def print_expected(targets: list[tuple[str, str]]) -> None:
    """``--list-targets``: every (target, goal) a run with these arguments records, as JSON, before anything runs (the
    GPU check lists each one in its table, NOT MEASURED where a run did not get to it)."""
    print(json.dumps([{"target": name, "goal": goal} for name, goal in targets]))


def write_targets(path: Path | None) -> None:
    """Append the targets recorded here to ``path`` (those streamed to the same file already are not repeated)."""
    if path is not None:
        same = os.environ.get("PEFTMED_TARGETS_JSON") and Path(os.environ["PEFTMED_TARGETS_JSON"]).resolve() == \
            Path(path).resolve()
        _append(Path(path), [t for t in TARGETS if not (same and id(t) in _STREAMED)])


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(samples, n=10)  # deciles: q[1] = p20, q[4] = p50, q[7] = p80
    return q[1], statistics.median(samples), q[7]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for mod in ("triton", "peft"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed: leave it out
            pass
    from peftmed import __version__

    out["peftmed"] = __version__
    return out


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:  # not a git checkout
        return "unknown"


def report(op: str, rows: list[dict], out_dir: Path) -> Path:
    """Print the table and append tidy CSV rows; returns the CSV path."""
    header = ["shape", "dtype", "mode", "provider", "p50 ms", "p20 ms", "p80 ms", "throughput", "vs baseline"]
    table = [[r["shape"], r["dtype"], r["mode"], r["provider"], f"{r['p50_ms']:.3f}", f"{r['p20_ms']:.3f}",
              f"{r['p80_ms']:.3f}", r["throughput"], r["vs_baseline"]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*header))
    print(line.format(*("-" * w for w in widths)))
    for r in table:
        print(line.format(*r))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{op}.csv"
    meta = {"device": rows[0]["device"], **versions(), "git_sha": git_sha(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    fields = ["op", "provider", "mode", "shape", "dtype", "p20_ms", "p50_ms", "p80_ms", "throughput",
              "vs_baseline", *meta]
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({"op": op, **r, **meta})
    print(f"\n{meta['device']}; " + ", ".join(f"{k} {v}" for k, v in versions().items())
          + f"; git {meta['git_sha']}; {meta['date']}\nrows appended to {path}")
    return path


def row(shape: str, dtype: torch.dtype, mode: str, provider: str, samples: list[float], device: str,
        throughput: str, baseline_p50: float | None) -> dict:
    p20, p50, p80 = percentiles(samples)
    ratio = "baseline" if baseline_p50 is None else f"{p50 / baseline_p50:.2f}x time"
    return {"shape": shape, "dtype": str(dtype).replace("torch.", ""), "mode": mode, "provider": provider,
            "p20_ms": p20, "p50_ms": p50, "p80_ms": p80, "throughput": throughput, "vs_baseline": ratio,
            "device": device_name(device)}
