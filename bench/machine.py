"""What every benchmark prints and checks: the machine, and how busy other processes kept it.

The scripts run as `python bench/NAME.py`, so this module is imported by its bare name.
"""
from __future__ import annotations

import os
import platform
import subprocess
import json
import time
from pathlib import Path


def machine_info() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    ram_gb = None
    try:
        kb = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                  if l.startswith("MemTotal"))
        ram_gb = round(kb / 1024 ** 2, 1)
    except (OSError, StopIteration):
        pass
    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram_gb, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft_version,
            "torch_threads": torch.get_num_threads()}


class ForeignLoad:
    """Share of the machine's CPU time used by other processes while a section runs (0 = an idle machine).

    From /proc/stat's busy time minus this process's and its (waited-for) children's own CPU time.
    """

    def __enter__(self):
        self.start = (self._busy(), self._own(), time.perf_counter())
        return self

    def __exit__(self, *exc):
        busy, own, wall = (b - a for a, b in zip(self.start, (self._busy(), self._own(), time.perf_counter())))
        self.share = max(0.0, (busy - own) / (wall * (os.cpu_count() or 1))) if wall > 0 else 0.0

    @staticmethod
    def _busy() -> float:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            return 0.0
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


def save_results(results: dict, path) -> None:
    """Write a benchmark's figures as JSON (the --json OUT flag of every script)."""
    if path:
        Path(path).write_text(json.dumps(results, indent=2) + "\n")
        print(f"saved {path}")


def print_foreign_load(shares: dict, per: str) -> None:
    print(f"other processes' share of the CPU per {per}: {shares} (0 = idle machine; above ~0.1 the figures "
          f"are disturbed)")


def print_aligned(header: tuple, lines: list[tuple]) -> None:
    """A plain-text table: first column left-aligned, the figures right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
    fmt = " | ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*header))
    print("-+-".join("-" * w for w in widths))
    for line in lines:
        print(fmt.format(*line))


def wait_for_idle(threshold: float, max_wait: float, window: float = 5.0) -> float:
    """Sleep until other processes use less than `threshold` of the CPU over `window` seconds (or give up)."""
    deadline = time.perf_counter() + max_wait
    while True:
        with ForeignLoad() as load:
            time.sleep(window)
        if load.share < threshold or time.perf_counter() > deadline:
            return load.share
        print(f"   (waiting: other processes are using {load.share:.0%} of the CPU)", flush=True)


def least_disturbed(run, retries: int, threshold: float, max_wait: float, disturbance=lambda r: r["foreign_cpu"],
                    wait_first: bool = False) -> dict:
    """`run()` again (after waiting for a quiet machine) while other processes disturbed it by more than
    `threshold` (`disturbance(result)`, kept as result["disturbed"]), up to `retries` times; the least disturbed
    result is kept. A result with an "error" is returned at once."""
    best = None
    for attempt in range(retries + 1):
        if attempt or wait_first:
            wait_for_idle(threshold, max_wait)
        result = run()
        result["attempt"] = attempt + 1
        if "error" in result:
            return result
        result["disturbed"] = disturbance(result)
        if best is None or result["disturbed"] < best["disturbed"]:
            best = result
        if result["disturbed"] <= threshold:
            break
        print(f"   (disturbed: other processes used {result['disturbed']:.0%} of the CPU; "
              f"{'rerunning' if attempt < retries else 'keeping the least disturbed run'})", flush=True)
    return best
