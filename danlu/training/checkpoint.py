"""Training checkpoints: trainable weights, optimizer, scheduler, data position and RNG state.

A checkpoint directory appears only when complete (written beside, then renamed), so a crash, a full
disk or Ctrl-C never leaves a half-written checkpoint to resume from. Only tensors and plain values are
stored, and everything is read with weights_only=True.

Under sharded data parallel (FSDP2) and tensor parallel the files are the same as one process writes: the
trainable weights and the optimizer state are gathered whole to the main rank (danlu.distributed.full_state),
and a resume loads them whole on every rank and shards them again; so a run resumes in its layout or in any other of
the same global batch (dp, fsdp, tp or one process: tests/distributed/test_resume_across_layouts.py). Saving and
loading torch.distributed.checkpoint's sharded files, so that no rank holds the whole state, is a later part of
issue 13.

A checkpoint that does not fit the run resuming from it (other trainable weights or shapes: another finetuning
setup, LoRA rank or target, model; another optimizer) is refused before any step, naming the first difference
and both setups (not a raw torch error about sizes).
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

from danlu.checkpoints.errors import CheckpointError
from danlu.distributed.full_state import (full_model_state, full_optimizer_state, is_sharded,
                                          load_full_model_state, shard_optimizer_state)
from danlu.utils.atomic import atomic_directory, remove_stale_temporaries
from danlu.utils.jsonfile import dumps_json
from danlu.utils.progress import logger

STATE_NAME = "trainer_state.json"
TRAINABLE_NAME = "trainable.safetensors"
EXTRA_STATE_NAME = "extra_state.safetensors"  # tensors of a run's own (DC-ASGD's mean square), when it has any
_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # this rank's micro-batches of the current epoch already consumed
    # optimizer-step groups of the current epoch already consumed: where a resume in another layout (same global
    # batch, other per-rank micro-batches) starts; None in checkpoints written before it was kept
    groups_in_epoch: Optional[int] = None
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


def load_trainable(model: torch.nn.Module, directory: Path, pipeline=None) -> None:
    """Put a checkpoint's trainable weights back into the model (a pipeline stage: its own of them)."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(directory) / TRAINABLE_NAME))
    if pipeline is not None:
        saved = pipeline.stage_trainable(saved)
    trainable = check_trainable(model, saved, directory)
    if is_sharded(model):
        load_full_model_state(model, {name: saved[name] for name in trainable})
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in trainable:
            params[name].copy_(saved[name])


def check_trainable(model: torch.nn.Module, saved: dict[str, torch.Tensor], directory: Path) -> list[str]:
    """The names of the model's trainable weights, once the checkpoint's (`saved`) are known to be the same names
    of the same whole shapes (nothing gathered: a DTensor's shape is its whole one); else a CheckpointError naming
    the first difference and what each side trains."""
    ours = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    theirs = {name: tuple(tensor.shape) for name, tensor in saved.items()}
    missing = [name for name in ours if name not in theirs]
    extra = [name for name in theirs if name not in ours]
    reshaped = [name for name in ours if name in theirs and ours[name] != theirs[name]]
    if missing:
        problem = f"the checkpoint does not hold {_few(missing)}"
    elif extra:
        problem = f"the checkpoint holds {_few(extra)}, which this run does not train"
    elif reshaped:
        name = reshaped[0]
        more = f" (and {len(reshaped) - 1} more tensors)" if len(reshaped) > 1 else ""
        problem = f"{name} is {list(theirs[name])} in the checkpoint but {list(ours[name])} in this run{more}"
    else:
        return list(ours)
    raise CheckpointError(f"{directory}: {problem}: it was saved with {_setup(theirs)} and this run has "
                          f"{_setup(ours)}; resume with the finetuning setup it was saved with (finetuning_type, "
                          f"lora_rank, lora_target, freeze settings, model), or start a new run without "
                          f"resume_from_checkpoint")


def check_optimizer(model: torch.nn.Module, optimizer, saved: dict, saved_class: Optional[str],
                    directory: Path) -> None:
    """Refuse (CheckpointError) an optimizer state_dict that does not map onto `optimizer`: another optimizer,
    other parameter groups, or per-element state (Adam's moments) of another shape than its weight."""
    ours = type(optimizer).__name__
    if saved_class is not None and saved_class != ours:
        raise CheckpointError(f"{directory}: the checkpoint was saved with the {saved_class} optimizer and this run "
                              f"uses {ours}; resume with the optim it was saved with")
    saved_sizes = [len(group["params"]) for group in saved["param_groups"]]
    our_sizes = [len(group["params"]) for group in optimizer.param_groups]
    if saved_sizes != our_sizes:
        raise CheckpointError(f"{directory}: the checkpoint's optimizer state holds parameter groups of "
                              f"{saved_sizes} tensors and this run's optimizer of {our_sizes}: it was saved by "
                              f"another finetuning or optimizer setup")
    names = {id(p): name for name, p in model.named_parameters()}
    saved_indices = [index for group in saved["param_groups"] for index in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in zip(saved_indices, params):
        for key, value in saved["state"].get(index, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"{directory}: the optimizer's {key} of {names.get(id(param), index)} is "
                                      f"{list(value.shape)} in the checkpoint but the weight is "
                                      f"{list(param.shape)} in this run: it was saved by another setup")


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")


def _setup(shapes: dict[str, tuple]) -> str:
    """What a set of trainable tensors says of the finetuning setup: LoRA's ranks and targets, and how many."""
    suffix = ".lora_A.weight"
    lora = {name[: -len(suffix)].rsplit(".", 1)[-1]: shape[0] for name, shape in shapes.items()
            if name.endswith(suffix)}
    count = f"{len(shapes)} trainable tensors"
    if not lora:
        return count
    ranks = sorted(set(lora.values()))
    rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
    return f"LoRA {rank} on {', '.join(sorted(lora))} ({count})"


def load_best(model: torch.nn.Module, output_dir: Path, state: TrainerState, pipeline=None) -> None:
    """Put the weights of the best evaluation (state.best_checkpoint) back into the model."""
    load_trainable(model, Path(output_dir) / state.best_checkpoint, pipeline)
    logger.info("loaded the best model (eval loss %.4f) from %s", state.best_eval_loss, state.best_checkpoint)


def save_checkpoint(output_dir: Path, state: TrainerState, model: torch.nn.Module, optimizer, scheduler,
                    save_total_limit: Optional[int] = None, topology=None, pipeline=None,
                    extra_state: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """checkpoint-N in output_dir, complete or absent; only the main rank writes. Under pipeline parallel the
    trainable weights of every stage are gathered whole (named as one process names them), and the optimizer
    state is kept per stage (a resume needs the same stages)."""
    from safetensors.torch import save_file

    target = Path(output_dir) / f"checkpoint-{state.global_step}"
    main = topology is None or topology.is_main
    if pipeline is not None:  # every stage sends its part to the first
        weights, optimizer_state = pipeline.trainable_state(), pipeline.optimizer_states(optimizer)
    elif is_sharded(model):  # gathered by every rank
        weights, optimizer_state = trainable_state(model), full_optimizer_state(optimizer)
    elif main:
        weights, optimizer_state = trainable_state(model), optimizer.state_dict()
    if not main:
        return target
    with atomic_directory(target) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in weights.items()}, str(tmp / TRAINABLE_NAME))
        if extra_state:
            save_file({k: v.contiguous().cpu() for k, v in extra_state.items()}, str(tmp / EXTRA_STATE_NAME))
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "optimizer_class": type(optimizer).__name__}, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng_state.pt")
        (tmp / STATE_NAME).write_text(dumps_json(asdict(state), indent=2), encoding="utf-8")
    if save_total_limit:
        keep = {target.name, state.best_checkpoint}
        old = [c for c in list_checkpoints(output_dir) if c.name not in keep]
        for c in old[: max(0, len(old) - (save_total_limit - 1))]:
            shutil.rmtree(c, ignore_errors=True)
    return target


def load_checkpoint(directory: Path, model: torch.nn.Module, optimizer, scheduler, pipeline=None) -> TrainerState:
    """Restore the model's trainable weights, optimizer, scheduler and RNG; returns the trainer state."""
    directory = Path(directory)
    state = TrainerState(**json.loads((directory / STATE_NAME).read_text(encoding="utf-8")))
    load_trainable(model, directory, pipeline)
    saved = torch.load(directory / "optimizer.pt", weights_only=True)
    if pipeline is not None:
        optimizer_state = pipeline.stage_optimizer_state(saved["optimizer"], directory)
    elif "stages" in saved["optimizer"]:
        raise ValueError(f"{directory}: saved by a pipeline-parallel run (stages {saved['optimizer']['stages']}); "
                         f"resume it with the same --parallel pp")
    else:
        optimizer_state = saved["optimizer"]
    check_optimizer(model, optimizer, optimizer_state, saved.get("optimizer_class"), directory)
    optimizer.load_state_dict(optimizer_state)
    if is_sharded(model):
        shard_optimizer_state(optimizer)
    scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(torch.load(directory / "rng_state.pt", weights_only=True))
    logger.info("resumed from %s at step %d", directory, state.global_step)
    return state


def load_extra_state(directory: Path) -> dict[str, torch.Tensor]:
    """The run's own tensors saved beside a checkpoint's weights (empty when it saved none)."""
    from safetensors.torch import load_file

    path = Path(directory) / EXTRA_STATE_NAME
    return load_file(str(path)) if path.is_file() else {}


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = _CHECKPOINT.search(path.name)
        if match and (path / STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def remove_stale_checkpoint_writes(output_dir: Path) -> list[Path]:
    """Remove from output_dir the temporaries of writes a crash cut short (danlu.utils.atomic's names only:
    `.checkpoint-N.<hex>.tmp`, `.staged.*.tmp`, `.trainer_log.jsonl.<hex>.tmp`, ...); a `.checkpoint-N.old` left
    between the two renames that replace checkpoint-N is renamed back when checkpoint-N is missing. A run
    calls it before it looks at output_dir (a directory holding only such leftovers holds no run)."""
    handled = remove_stale_temporaries(Path(output_dir), keep_old_of=lambda name: bool(_CHECKPOINT.fullmatch(name)))
    if handled:
        logger.info("removed what a stopped run's unfinished writes left in %s: %s", output_dir,
                    ", ".join(p.name for p in handled))
    return handled


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
