"""How long `peftmed --help` and the listing commands take against `import torch`, from one run.

    python benchmarks/cli/help_time.py              # 9 rounds
    python benchmarks/cli/help_time.py --rounds 21

Each round starts one fresh process per command, in a shuffled order (a busy machine slows every command of the
round alike): `python -c "import torch"` (the floor: every peftmed command needs torch), `python -m peftmed
--help`, `python -m peftmed methods` and `python -m peftmed plan --help`. Byte-code caching is on (a first warm-up
round writes it, as any installed package has it). Printed: per command the median and the minimum wall time and
the median of the per-round ratio to `import torch`. Target: `--help` at most 1.2x `import torch`.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "import torch": ["-c", "import torch"],
    "peftmed --help": ["-m", "peftmed", "--help"],
    "peftmed methods": ["-m", "peftmed", "methods"],
    "peftmed plan --help": ["-m", "peftmed", "plan", "--help"],
}
TARGET = 1.2


def wall(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    for command in COMMANDS.values():  # warm-up: byte code written, files in the page cache
        wall(command, env)
    rng = random.Random(args.seed)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    ratios: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        order = list(COMMANDS)
        rng.shuffle(order)
        this = {name: wall(COMMANDS[name], env) for name in order}
        for name, seconds in this.items():
            times[name].append(seconds)
            ratios[name].append(seconds / this["import torch"])
    print(f"{args.rounds} rounds, python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} cores")
    print(f"{'command':<22} {'median s':>9} {'min s':>7} {'x import torch':>15}")
    for name in COMMANDS:
        print(f"{name:<22} {statistics.median(times[name]):9.2f} {min(times[name]):7.2f} "
              f"{statistics.median(ratios[name]):15.2f}")
    help_ratio = statistics.median(ratios["peftmed --help"])
    verdict = "met" if help_ratio <= TARGET else "NOT met"
    print(f"target: peftmed --help <= {TARGET}x import torch: {verdict} ({help_ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
