"""The bench's busy-machine check counts other work, not the bench's own jobs (the load average counts both: a
quiet 2-core machine running the default suite showed 4.8 and a warning)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftmed.bench.load import BUSY_CORES, OtherWork, busy_note

pytestmark = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc (Linux)")

SPIN = "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\n"


def _spin_own(seconds: float) -> None:
    subprocess.run([sys.executable, "-c", SPIN.format(s=seconds)], check=True)


def _spin_foreign(seconds: float, done: Path) -> None:
    """A process outside this process tree: started by a child that exits at once (it is then not reaped by
    anything of ours)."""
    spin = SPIN.format(s=seconds) + f"open({str(done)!r}, 'w').close()\n"
    code = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {spin!r}], start_new_session=True)\n"
    subprocess.run([sys.executable, "-c", code], check=True)


def _measure(run) -> float:
    watch = OtherWork()
    start = time.monotonic()
    run()
    while time.monotonic() - start < 2.0:
        time.sleep(0.05)
    value = watch.stop()
    assert value is not None
    return value


def test_own_children_are_not_other_work_and_a_foreign_process_is(tmp_path):
    own = _measure(lambda: _spin_own(1.5))
    done = tmp_path / "done"

    def foreign():
        _spin_foreign(1.5, done)
        deadline = time.monotonic() + 30
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert done.exists()

    other = _measure(foreign)
    # 1.5 CPU seconds outside the tree over at most a few seconds of wall time: at least a third of a core more
    assert other - own > 0.3, (own, other)


def test_busy_note_judges_other_work_where_known(monkeypatch):
    cores = os.cpu_count() or 1
    assert busy_note({"other_work_cores": 0.1, "load_average_start": 50.0}) is None
    note = busy_note({"other_work_cores": BUSY_CORES + 0.3, "load_average_start": 0.1})
    assert note and f"other work used {BUSY_CORES + 0.3:.1f} of its {cores} cores" in note
    assert busy_note({"other_work_cores": None, "load_average_start": cores + 1.0}) is not None
    assert busy_note({"other_work_cores": None, "load_average_start": 0.0}) is None
