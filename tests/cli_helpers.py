"""``peftmed`` as a user runs it: a subprocess, its exit code and the words of its message."""

import os
import subprocess
import sys


def peftmed(*args, env=None, cwd=None, timeout=600):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "peftmed", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def refused(proc, *needles):
    """Exit code 2, no traceback, and every needle in the message."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])
    return proc
