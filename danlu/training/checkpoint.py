"""Training checkpoints: trainable weights, optimizer, scheduler, data position and RNG state.

A checkpoint directory appears only when complete (written beside, then renamed), so a crash, a full
disk or Ctrl-C never leaves a half-written checkpoint to resume from. Only tensors and plain values are
stored, and everything is read with weights_only=True.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from danlu.utils.atomic import atomic_directory

STATE_NAME = "trainer_state.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    best_eval_loss: Optional[float] = None
    best_checkpoint: Optional[str] = None
    tokens_seen: int = 0


def save_checkpoint(output_dir: Path, state: TrainerState, trainable: dict[str, torch.Tensor],
                    optimizer, scheduler, save_total_limit: Optional[int] = None) -> Path:
    from safetensors.torch import save_file

    target = Path(output_dir) / f"checkpoint-{state.global_step}"
    with atomic_directory(target) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng_state.pt")
        (tmp / STATE_NAME).write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")
    if save_total_limit:
        keep = {target.name, state.best_checkpoint}
        old = [c for c in list_checkpoints(output_dir) if c.name not in keep]
        for c in old[: max(0, len(old) - (save_total_limit - 1))]:
            shutil.rmtree(c, ignore_errors=True)
    return target


def load_checkpoint(directory: Path, optimizer, scheduler) -> tuple[TrainerState, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    directory = Path(directory)
    state = TrainerState(**json.loads((directory / STATE_NAME).read_text(encoding="utf-8")))
    trainable = load_file(str(directory / "trainable.safetensors"))
    saved = torch.load(directory / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(torch.load(directory / "rng_state.pt", weights_only=True))
    return state, trainable


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = _CHECKPOINT.search(path.name)
        if match and (path / STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
