"""Training logs: trainer_log.jsonl always, TensorBoard when asked, loss curves as PNG with plot_loss."""
from __future__ import annotations

import json
import os
from pathlib import Path

from danlu.utils.progress import logger

LOG_NAME = "trainer_log.jsonl"


class TrainingLog:
    def __init__(self, output_dir: Path, report_to: str = "none", resume: bool = False):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / LOG_NAME
        if not resume and self.path.exists():
            self.path.unlink()
        self.tensorboard = None
        if report_to in ("tensorboard", "all"):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("report_to tensorboard needs the tensorboard package (pip install tensorboard)") \
                    from None
            self.tensorboard = SummaryWriter(str(self.output_dir / "runs"))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"train/{key}" if key != "eval_loss" else "eval/loss", value,
                                                record["step"])

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def finish(self, plot: bool) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if plot:
            plot_losses(self.records(), self.output_dir)


def memory_gib(device) -> float:
    """Peak GPU memory allocated on a GPU; the process's resident memory on a CPU."""
    import torch

    if getattr(device, "type", device) == "cuda":
        return torch.cuda.max_memory_allocated() / 1024**3
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def plot_losses(records: list[dict], output_dir: Path) -> list[Path]:
    """training_loss.png (raw and smoothed) and, when there was validation, eval_loss.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, file_name, title in (("loss", "training_loss.png", "training loss"),
                                  ("eval_loss", "eval_loss.png", "validation loss")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if not points:
            continue
        steps, values = zip(*points)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, values, color="#1f77b4", alpha=0.4 if len(values) > 5 else 1.0, label="original")
        if len(values) > 5:
            ax.plot(steps, _smooth(values), color="#1f77b4", label="smoothed")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{title} of {output_dir}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(output_dir / file_name, dpi=100)
        plt.close(fig)
        written.append(output_dir / file_name)
        logger.info("wrote %s", output_dir / file_name)
    return written


def _smooth(values, weight: float = 0.9) -> list[float]:
    smoothed, last = [], values[0]
    for v in values:
        last = last * weight + (1 - weight) * v
        smoothed.append(last)
    return smoothed
