"""Training checkpoints: trainable weights, optimizer, scheduler, data position and RNG state.

A checkpoint directory appears only when complete (written beside, then renamed), so a crash, a full
disk or Ctrl-C never leaves a half-written checkpoint to resume from. Only tensors and plain values are
stored, and everything is read with weights_only=True.

Under sharded data parallel (FSDP2) and tensor parallel the files are the same as one process writes: the
trainable weights and the optimizer state are gathered whole to the main rank (danlu.distributed.full_state),
and a resume loads them whole on every rank and shards them again; so a run resumes at its layout. Resuming in another
layout from torch.distributed.checkpoint's sharded files is a later part of issue 13.
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

from danlu.distributed.full_state import (full_model_state, full_optimizer_state, is_sharded,
                                          load_full_model_state, shard_optimizer_state)
from danlu.utils.atomic import atomic_directory
from danlu.utils.progress import logger

STATE_NAME = "trainer_state.json"
TRAINABLE_NAME = "trainable.safetensors"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    best_eval_loss: Optional[float] = None
    best_checkpoint: Optional[str] = None
    tokens_seen: int = 0

    def is_new_best(self, eval_loss: float) -> bool:
        """Record an evaluation; True when it is the best so far (its checkpoint is then this step's)."""
        if self.best_eval_loss is not None and eval_loss >= self.best_eval_loss:
            return False
        self.best_eval_loss, self.best_checkpoint = eval_loss, f"checkpoint-{self.global_step}"
        return True


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights that train, by name: what a checkpoint keeps of the model (the one place that decides it).
    A sharded model's are gathered whole to the main rank (a collective; the other ranks get only the names)."""
    trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not is_sharded(model):
        return trainable
    gathered = full_model_state(model, trainable_only=True)
    return {name: gathered.get(name) for name in trainable}


def load_trainable(model: torch.nn.Module, directory: Path) -> None:
    """Put a checkpoint's trainable weights back into the model."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(directory) / TRAINABLE_NAME))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]  # names only: nothing gathered
    missing = [name for name in trainable if name not in saved]
    if missing:
        raise ValueError(f"{directory}: the checkpoint does not hold {missing[:3]}: it was saved by a different "
                         f"finetuning setup")
    if is_sharded(model):
        load_full_model_state(model, {name: saved[name] for name in trainable})
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in trainable:
            params[name].copy_(saved[name])


def load_best(model: torch.nn.Module, output_dir: Path, state: TrainerState) -> None:
    """Put the weights of the best evaluation (state.best_checkpoint) back into the model."""
    load_trainable(model, Path(output_dir) / state.best_checkpoint)
    logger.info("loaded the best model (eval loss %.4f) from %s", state.best_eval_loss, state.best_checkpoint)


def save_checkpoint(output_dir: Path, state: TrainerState, model: torch.nn.Module, optimizer, scheduler,
                    save_total_limit: Optional[int] = None, topology=None) -> Path:
    """checkpoint-N in output_dir, complete or absent; only the main rank writes."""
    from safetensors.torch import save_file

    target = Path(output_dir) / f"checkpoint-{state.global_step}"
    sharded = is_sharded(model)
    if topology is not None and not topology.is_main and not sharded:
        return target
    weights = trainable_state(model)  # gathered by every rank when sharded
    optimizer_state = full_optimizer_state(optimizer) if sharded else optimizer.state_dict()
    if topology is not None and not topology.is_main:
        return target
    with atomic_directory(target) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in weights.items()}, str(tmp / TRAINABLE_NAME))
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng_state.pt")
        (tmp / STATE_NAME).write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")
    if save_total_limit:
        keep = {target.name, state.best_checkpoint}
        old = [c for c in list_checkpoints(output_dir) if c.name not in keep]
        for c in old[: max(0, len(old) - (save_total_limit - 1))]:
            shutil.rmtree(c, ignore_errors=True)
    return target


def load_checkpoint(directory: Path, model: torch.nn.Module, optimizer, scheduler) -> TrainerState:
    """Restore the model's trainable weights, optimizer, scheduler and RNG; returns the trainer state."""
    directory = Path(directory)
    state = TrainerState(**json.loads((directory / STATE_NAME).read_text(encoding="utf-8")))
    load_trainable(model, directory)
    saved = torch.load(directory / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    if is_sharded(model):
        shard_optimizer_state(optimizer)
    scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(torch.load(directory / "rng_state.pt", weights_only=True))
    logger.info("resumed from %s at step %d", directory, state.global_step)
    return state


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
