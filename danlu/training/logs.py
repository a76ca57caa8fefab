"""Training logs: trainer_log.jsonl always, TensorBoard when asked, loss curves as PNG with plot_loss."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from danlu.utils.atomic import atomic_write_text
from danlu.utils.jsonfile import dumps_json
from danlu.utils.progress import logger, progress

LOG_NAME = "trainer_log.jsonl"


class TrainingLog:
    """What a run reports. On ranks other than the main one (enabled=False) nothing is written."""

    def __init__(self, output_dir: Path, report_to: str = "none", resume: bool = False, enabled: bool = True,
                 include_tokens_seen: bool = False):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOG_NAME
        self.enabled, self.include_tokens_seen = enabled, include_tokens_seen
        self.tensorboard = None
        self._window_start()
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if not resume and self.path.exists():
            self.path.unlink()
        if report_to in ("tensorboard", "all"):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("report_to tensorboard needs the tensorboard package (pip install tensorboard)") \
                    from None
            self.tensorboard = SummaryWriter(str(self.output_dir / "runs"))

    def start_progress(self, total_steps: int, done: int) -> None:
        """The progress bar, `done` steps in (a resume); the log keeps only the records up to that step, since the
        run writes the later ones again (a run that crashed after its last checkpoint had written some)."""
        if self.enabled and done and self.path.exists():
            self._keep_records_up_to(done)
        self.bar = progress(total=total_steps, desc="Training", unit="step", disable=not self.enabled)
        self.bar.update(done)

    def _keep_records_up_to(self, step: int) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if (record := _parse(line)) is not None and record.get("step", 0) <= step]
        if len(kept) < len(lines):
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def close_progress(self) -> None:
        self.bar.close()

    def _window_start(self) -> None:
        self.loss, self.steps, self.tokens, self.started = 0.0, 0, 0, time.perf_counter()
        self.metrics: dict[str, list[float]] = {}  # key -> [sum, count]: a metric a batch lacks is not a zero

    def add_step(self, loss: float, outputs: list, tokens: int) -> None:
        """One optimizer step (the StepOutputs of its micro-batches) into the logging window; `tokens`: the
        step's input tokens over all data-parallel ranks."""
        self.loss, self.steps = self.loss + loss, self.steps + 1
        self.tokens += tokens
        for out in outputs:
            for key, value in out.metrics.items():
                total = self.metrics.setdefault(key, [0.0, 0])
                total[0], total[1] = total[0] + float(value), total[1] + 1
        self.bar.update(1)

    def write_window(self, state, lr: float, epoch: float, device) -> dict:
        """Write the means of the window's steps (loss, metrics), its throughput and memory; start a new one."""
        steps = max(self.steps, 1)
        record = {"step": state.global_step, "loss": self.loss / steps, "lr": lr, "epoch": epoch,
                  **{k: total / count for k, (total, count) in self.metrics.items()},
                  "tokens_per_s": self.tokens / max(time.perf_counter() - self.started, 1e-9),
                  "memory_gib": memory_gib(device)}
        if self.include_tokens_seen:
            record["num_input_tokens_seen"] = state.tokens_seen
        self.write(record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}", mem=f"{record['memory_gib']:.2f}G")
        self._window_start()
        return record

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(dumps_json(record) + "\n")  # an inf or nan metric is null: the file stays JSON
            f.flush()
            os.fsync(f.fileno())
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}", value,
                                                record["step"])

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return [record for line in lines if (record := _parse(line)) is not None]

    def finish(self, plot: bool) -> None:
        if not self.enabled:
            return
        if self.tensorboard is not None:
            self.tensorboard.close()
        if plot:
            plot_losses(self.records(), self.output_dir)


def _parse(line: str):
    """A record of the log, or None for a blank line or one a crash cut short (or that is not a record)."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


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
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
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
