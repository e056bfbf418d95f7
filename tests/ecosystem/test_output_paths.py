"""Every command that writes checks its output path before any work, with one message: a parent that is a file,
a folder that cannot hold files (/proc), a name longer than the file system allows, a path over PATH_MAX.
These were raw tracebacks (NotADirectoryError, OSError: File name too long...) in train, predict, merge, convert
and bench --compare --output."""

import os
import subprocess
import sys

import pytest

from peftmed.cli import main


def _paths(tmp_path):
    (tmp_path / "afile").write_text("a file, not a folder")
    return {
        "parent is a file": (str(tmp_path / "afile" / "sub"), "is a file, not a folder"),
        "/proc": ("/proc/peftmed-out/x", "cannot be written"),
        "long name": (str(tmp_path / ("n" * 300)), "this file system allows 255"),
        "over PATH_MAX": (str(tmp_path / "/".join(["d" * 200] * 25)), "this file system allows paths shorter than"),
    }


def _commands(tmp_path, out):
    adapter = tmp_path / "no-adapter"  # never reached: the output is checked first
    (tmp_path / "q.jsonl").write_text('{"image": "x.png", "question": "q?"}\n')
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "src" / "config.json").write_text('{"model_type": "llava"}')
    return {
        "train": ["train", "--backbone", "miss-tiny", "--recipe", "*=layernorm", "--dataset", "phantom", "--steps", "1",
                  "--output", out],
        "eval": ["eval", "--adapter", adapter, "--output", out],
        "predict": ["predict", "--adapter", adapter, "--input", tmp_path / "q.jsonl", "--output", out],
        "merge": ["merge", "--adapter", adapter, "--output", out],
        "convert": ["convert", "llava-med", tmp_path / "src", out],
        "bench": ["bench", "--recipes", "*=layernorm", "--steps", "1", "--no-peft", "--output", out],
        "bench --compare": ["bench", "--compare", tmp_path / "a", tmp_path / "b", "--output", out],
    }


@pytest.mark.parametrize("command", ["train", "eval", "predict", "merge", "convert", "bench", "bench --compare"])
@pytest.mark.parametrize("case", ["parent is a file", "/proc", "long name", "over PATH_MAX"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, command, case):
    if case == "/proc" and not os.path.isdir("/proc"):
        pytest.skip("no /proc here")
    out, needle = _paths(tmp_path)[case]
    argv = [str(a) for a in _commands(tmp_path, out)[command]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and ("--output" in err or "DST" in err), err


def test_as_a_user_sees_it(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = subprocess.run([sys.executable, "-m", "peftmed", "train", "--backbone", "miss-tiny", "--recipe", "*=layernorm",
                        "--dataset", "phantom", "--steps", "1", "--output", str(tmp_path / "afile" / "run")],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"--output '{tmp_path / 'afile' / 'run'}' cannot be created: '{tmp_path / 'afile'}' is a file" in r.stderr
