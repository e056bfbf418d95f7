"""Peak memory of one bench job, measured honestly for the device it runs on.

- CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``) after a reset.
- CPU on Linux: the growth of the process's peak resident set (``VmHWM`` in ``/proc/self/status``)
  from the moment the probe starts. Writing ``5`` to ``/proc/self/clear_refs`` resets the peak to the
  current resident size first, so memory used earlier (imports, data loading) does not count. Each
  job runs in a fresh worker process, so memory freed by an earlier recipe cannot hide in the heap.
- CPU elsewhere: growth of ``ru_maxrss``, which cannot be reset; stated as such.

``MemoryProbe.method`` says which of these produced the figure; the bench writes it into the results.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

MIB = 1024 * 1024
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


class MemoryProbe:
    """``start()`` before building the model, ``peak_mib()`` after training."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = ""
        self._base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated growth"
            return
        if self._reset_hwm():
            self._base = _status_kib("VmRSS") * 1024
            self.method = "VmHWM growth after clear_refs reset (fresh process per recipe)"
        else:
            self._base = _maxrss_bytes()
            self.method = "ru_maxrss growth (peak cannot be reset here; fresh process per recipe)"

    @staticmethod
    def _reset_hwm() -> bool:
        if _status_kib("VmHWM") is None:
            return False
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return True

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            peak = _status_kib("VmHWM") * 1024
        else:
            peak = _maxrss_bytes()
        return max(peak - self._base, 0) / MIB
