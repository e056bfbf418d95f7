"""Resume skips the recipes already done; settings and versions are checked; --compare prints both."""

import json

import pytest

import peftmed.bench.runner as runner
from peftmed.bench import results, run_bench
from peftmed.bench.results import ResultsError
from peftmed.cli import main
from peftmed.errors import ConfigError


@pytest.fixture(scope="module")
def done(tmp_path_factory, mini):
    out = tmp_path_factory.mktemp("resume") / "run"
    run_bench(mini(out, peft=False, recipes=["*=layernorm", "*=bitfit"]), echo=lambda _: None)
    return out


def _count_jobs(monkeypatch):
    from peftmed.bench.worker import run_job as real

    calls = []

    def counting(job):
        calls.append(job.label)
        return real(job)

    monkeypatch.setattr(runner, "run_job", counting)
    return calls


def test_resume_runs_only_new_recipes(done, mini, monkeypatch):
    calls = _count_jobs(monkeypatch)
    before = json.loads((done / "results.json").read_text())["rows"]
    data = run_bench(mini(done, peft=False, resume=True, recipes=["*=layernorm", "*=bitfit", "*=ffn"]),
                     echo=lambda _: None)
    assert calls == ["*=ffn"]  # the two finished recipes were read back, not rerun
    rows = {r["label"]: r for r in data["rows"]}
    assert rows["*=layernorm"].get("resumed") and rows["*=bitfit"].get("resumed")
    old = {r["label"]: r for r in before}
    assert rows["*=layernorm"]["acc_overall"] == old["*=layernorm"]["acc_overall"]
    assert rows["*=ffn"]["status"] == "ok"


class SimulatedKill(Exception):
    pass


def test_interrupted_job_is_rerun(tmp_path, mini, monkeypatch):
    out = tmp_path / "run"
    from peftmed.bench.worker import run_job as real

    def interrupted(job):  # the second recipe is "killed" midway: no result file is written for it
        if job.label == "*=bitfit":
            raise SimulatedKill
        return real(job)

    monkeypatch.setattr(runner, "run_job", interrupted)
    config = mini(out, peft=False, recipes=["*=layernorm", "*=bitfit"])
    with pytest.raises(SimulatedKill):
        run_bench(config, echo=lambda _: None)
    assert results.job_file(out, "*=layernorm", "peftmed", 0).is_file()
    assert not results.job_file(out, "*=bitfit", "peftmed", 0).exists()
    calls = _count_jobs(monkeypatch)
    run_bench(mini(out, peft=False, recipes=["*=layernorm", "*=bitfit"], resume=True), echo=lambda _: None)
    assert calls == ["*=bitfit"]


def test_existing_folder_needs_resume(done, mini):
    with pytest.raises(ConfigError, match="--resume"):
        run_bench(mini(done, peft=False), echo=lambda _: None)


def test_resume_with_other_settings_refused(done, mini):
    with pytest.raises(ConfigError, match="steps was 2, now 3"):
        run_bench(mini(done, peft=False, resume=True, steps=3), echo=lambda _: None)


def test_incompatible_version_refused(done, tmp_path, mini, capsys):
    doc = json.loads((done / "results.json").read_text())
    doc["format_version"] = 99
    doc["meta"]["peftmed"] = "9.0.0"
    old = tmp_path / "old"
    old.mkdir()
    (old / "results.json").write_text(json.dumps(doc))
    with pytest.raises(ResultsError, match="peftmed 9.0.0 in bench format version 99"):
        run_bench(mini(old, peft=False, resume=True), echo=lambda _: None)
    assert main(["bench", "--compare", str(done), str(old)]) == 2
    assert "format version 99" in capsys.readouterr().err


def test_compare_prints_both_folders(done, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # without --output, compare.html goes to the current folder
    other = tmp_path / "other"
    doc = json.loads((done / "results.json").read_text())
    for row in doc["rows"] + doc["summary"]:
        if row["label"] == "*=bitfit":
            row["throughput"] = 2 * row["throughput"]
    other.mkdir()
    (other / "results.json").write_text(json.dumps(doc))
    assert main(["bench", "--compare", str(done), str(other)]) == 0
    text = capsys.readouterr().out
    assert str(done) in text and str(other) in text
    line = next(l for l in text.splitlines() if l.startswith("*=bitfit"))
    assert "2.00" in line.split()  # B/A of the doubled throughput
    assert (tmp_path / "compare.html").exists()
    line = next(l for l in text.splitlines() if l.startswith("*=layernorm"))
    cells = line.split()[1:]
    triples = list(zip(cells[0::3], cells[1::3], cells[2::3]))  # (A, B, B/A) per figure
    assert len(triples) >= 3
    for a, b, ratio in triples:  # identical figures: ratio 1, or "-" where A is 0 (e.g. no memory growth)
        assert a == b and (ratio == "1.00" or (ratio == "-" and float(a) == 0)), line
    assert [r for _, _, r in triples].count("1.00") >= 2, line  # throughput and time at least
