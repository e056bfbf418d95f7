"""``peftmed bench``: every method side by side on a Med-VLM, against huggingface/peft.

    from peftmed.bench import BenchConfig, run_bench
    data = run_bench(BenchConfig(recipes=["*=layernorm", "F|LoRA|LoRA"], steps=20, output="bench-results/x"))
    for row in data["rows"]:
        print(row["label"], row["provider"], row["acc_overall"], row["throughput"], row["peak_memory_mib"])

Modules: ``suites`` (built-in suites, suite files), ``runner`` (planning, fresh process per job,
resume), ``worker`` (one job: apply, train, evaluate, measure), ``memory`` (peak memory per device),
``task`` (data/model/evaluation glue), ``results`` (tidy files, metadata), ``report`` (table, plots,
Markdown, compare), ``cli`` (the command).
"""

from .results import read_results
from .runner import BenchConfig, run_bench
from .suites import BUILTIN_SUITES, SuiteEntry, read_suite_file

__all__ = ["BUILTIN_SUITES", "BenchConfig", "SuiteEntry", "read_results", "read_suite_file", "run_bench"]
