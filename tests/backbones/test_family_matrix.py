"""benchmarks/family_matrix.py, the table behind the families' closing figures, on one family: every cell it
measures passes, and a method peft keeps as modules_to_save (full) gets no peft cell instead of an error."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import family_matrix  # noqa: E402


def test_the_matrix_passes_on_a_family_with_full_tuning_and_a_plugin_method(capsys):
    code = family_matrix.main(["--only", "qwen2-vl", "--methods", "lora", "full", "dora"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("qwen2-vl ")}
    assert rows["full"][2] == "yes" and rows["full"][-2] == "-"  # no peft adapter: "-", not an error
    assert float(rows["dora"][-2]) <= family_matrix.TOL  # the DoRA plugin's peft export gives the same logits
    assert "0 failing rows" in out
