"""How busy the machine was with other work while the bench ran.

The load average counts runnable threads, the bench's own included (and idle helper threads of its jobs that
wake up often: a 2-job suite alone shows 3-5 on 2 cores), so it cannot tell a quiet machine from a busy one.
``OtherWork`` reads instead the CPU time the whole machine spent (``/proc/stat``: user, nice, system, irq,
softirq and steal, the time a hypervisor gave to other guests) and the CPU time of this process and its
descendants (``/proc/<pid>/stat``: their own time plus that of the children they reaped), at the start and at
the end. The difference, over the wall time, is the number of cores other work used on average.
Linux only; elsewhere ``cores`` is None and the load average alone is recorded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# above this many cores of other work on average, timings are not comparable with another run's
BUSY_CORES = 0.5


def _machine_ticks() -> int | None:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, *rest = (int(x) for x in fields[1:])
    steal = rest[0] if rest else 0
    return user + nice + system + irq + softirq + steal


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out.extend(int(x) for x in (task / "children").read_text().split())
            except OSError:
                continue
    except OSError:
        pass
    return out


def _tree_ticks(root: int) -> int:
    """CPU ticks of ``root`` and every living descendant, each with the ticks of the children it has reaped."""
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; field 3 (state) is fields[0]
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime, stime, cutime, cstime
        todo.extend(_children(pid))
    return total


class OtherWork:
    """Cores used on average by work outside this process tree between ``__init__`` and ``stop``."""

    def __init__(self) -> None:
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start = (time.monotonic(), _machine_ticks(), _tree_ticks(os.getpid()))

    def stop(self) -> float | None:
        t0, machine0, own0 = self._start
        machine1 = _machine_ticks()
        if machine0 is None or machine1 is None:
            return None
        seconds = time.monotonic() - t0
        if seconds <= 0:
            return None
        others = (machine1 - machine0) - (_tree_ticks(os.getpid()) - own0)
        return round(max(0.0, others / self._hz / seconds), 2)


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not on every platform
        return None


def busy_note(meta: dict) -> str | None:
    """A warning when other work competed for the cores: timings are then not comparable with another run's (on
    a loaded 2-core machine two threads ran 2.6x slower per step than one). Judged by the cores other work used
    where that is known, else by the load average at the start (before the bench's own jobs)."""
    cores = os.cpu_count() or 1
    others = meta.get("other_work_cores")
    start = meta.get("load_average_start")
    if others is not None:
        if others >= BUSY_CORES:
            return (f"warning: the machine was busy: other work used {others:.1f} of its {cores} cores on average "
                    f"while the bench ran; samples/s and step times are not comparable with another run's; accuracies "
                    f"are unaffected")
        return None
    if start is not None and start > cores:
        return (f"warning: the machine was busy (load average {start:.1f} on {cores} cores at the start): samples/s "
                f"and step times are not comparable with another run's; accuracies are unaffected")
    return None
