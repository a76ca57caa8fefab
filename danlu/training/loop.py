"""The training loop, for every stage. It knows no loss: a Stage hands it data and `step(model, batch)`.

`fit` does, once for all stages: the epoch order (sharded by rank), gradient accumulation, clipping,
autocast and fp16 loss scaling, logging, evaluation, checkpoints and resume, Ctrl-C and NaN handling.

Data parallel (the model already wrapped by danlu.distributed.data_parallel, a process group joined): each rank
steps on its share of every micro-batch, and the result is the step one process would take on the whole of it.
A step returns the mean of its loss over its batch's StepOutput.weight (labelled tokens, pairs, ...); each
rank's mean is weighted by its share of the micro-batch's weight over all ranks, so that the gradients DDP and
FSDP average over the ranks are those of the whole micro-batch's mean, and the logged loss is that mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from danlu.distributed.data_parallel import gradient_sync
from danlu.training.checkpoint import TrainerState, latest_checkpoint, load_best, load_checkpoint, save_checkpoint
from danlu.training.evaluate import evaluate
from danlu.training.logs import TrainingLog
from danlu.training.order import epoch_plan
from danlu.training.stage import Stage, StepOutput
from danlu.training.topology import Topology
from danlu.utils.progress import logger


class TrainingStopped(RuntimeError):
    """Training stopped early (NaN loss); the last good checkpoint is kept."""


@dataclass
class FitConfig:
    output_dir: Path
    max_steps: int
    batch_size: int = 1
    eval_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = 500
    eval_strategy: str = "no"  # no | steps | epoch
    eval_steps: int = 500
    save_total_limit: Optional[int] = None
    load_best_model_at_end: bool = False
    seed: int = 42
    shuffle: str = "global"  # global | local (order.shard_order)
    autocast_dtype: Optional[torch.dtype] = None
    resume_from: Optional[Path] = None
    log: Optional[TrainingLog] = field(default=None, repr=False)  # None: trainer_log.jsonl in output_dir


@dataclass
class FitResult:
    state: TrainerState
    train_losses: list[float] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)


def fit(model, stage: Stage, optimizer, scheduler, config: FitConfig, topology: Topology = Topology(),
        pipeline=None, after_step: Optional[Callable[[int], None]] = None) -> FitResult:
    """Train `model` on `stage` for config.max_steps optimizer steps (continuing a checkpoint if given).

    With a `pipeline` (danlu.distributed.pipeline_parallel.Pipeline) `model` is this rank's stage, and each optimizer
    step's micro-batches run through the pipeline's schedule instead of one after the other. `after_step(step)`
    runs after each optimizer step, before its checkpoint (local models aggregate there)."""
    run = _Run(model, stage, optimizer, scheduler, config, topology, pipeline, after_step)
    model.train()
    try:
        while run.state.global_step < config.max_steps:
            groups, batches = epoch_plan(len(stage.train), config.seed, run.state.epoch, config.batch_size,
                                         config.gradient_accumulation_steps, topology, config.shuffle)
            for group in groups[run.groups_done():]:
                if run.state.global_step >= config.max_steps:
                    break
                run.train_on([[stage.train[i] for i in batch] for batch in group], batches)
            else:
                run.state.epoch, run.state.batch_in_epoch, run.state.groups_in_epoch = run.state.epoch + 1, 0, 0
                if config.eval_strategy == "epoch":
                    run.evaluate()
    except KeyboardInterrupt:
        logger.info("interrupted: saved %s; resume with --resume_from_checkpoint latest", run.save())
        raise
    finally:
        run.log.close_progress()
    if config.eval_strategy != "no" and (not run.result.eval_losses or run.state.global_step % config.eval_steps):
        run.evaluate()
    run.save()
    if config.load_best_model_at_end and run.state.best_checkpoint:
        load_best(model, config.output_dir, run.state, pipeline)
    return run.result


def forward_step(stage: Stage, model, batch: dict, device: torch.device,
                 autocast_dtype: Optional[torch.dtype]) -> StepOutput:
    """The stage's step on one batch, moved to `device`, under autocast when a dtype is given."""
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        return stage.step(model, batch)


class _Run:
    """The state of one fit: what an optimizer step, an evaluation and a checkpoint share."""

    def __init__(self, model, stage, optimizer, scheduler, config, topology, pipeline=None, after_step=None):
        self.model, self.stage, self.optimizer, self.scheduler = model, stage, optimizer, scheduler
        self.config, self.topology, self.pipeline, self.after_step = config, topology, pipeline, after_step
        self.extra_state: Optional[Callable[[], dict]] = None  # more tensors for each checkpoint (a run's own)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        # fp16 gradients underflow without loss scaling; bf16 and float32 need none (then a no-op)
        self.scaler = torch.amp.GradScaler(topology.device.type, enabled=config.autocast_dtype == torch.float16)
        resumed = config.resume_from is not None
        self.state = (load_checkpoint(config.resume_from, model, optimizer, scheduler, pipeline) if resumed
                      else TrainerState())
        self.result = FitResult(self.state)
        self.log = config.log or TrainingLog(config.output_dir, resume=resumed, enabled=topology.is_main)
        self.log.start_progress(config.max_steps, self.state.global_step)

    def groups_done(self) -> int:
        """The optimizer-step groups of the current epoch already trained on (counted in groups, not in this
        run's micro-batches, so that a checkpoint of another layout with the same global batch resumes at the
        same examples)."""
        state = self.state
        if state.groups_in_epoch is None:  # an older checkpoint: its micro-batches were of this layout
            state.groups_in_epoch = state.batch_in_epoch // self.config.gradient_accumulation_steps
        state.batch_in_epoch = state.groups_in_epoch * self.config.gradient_accumulation_steps
        return state.groups_in_epoch

    def forward(self, batch: dict) -> StepOutput:
        return forward_step(self.stage, self.model, batch, self.topology.device, self.config.autocast_dtype)

    def train_on(self, group: list[list], batches_in_epoch: int) -> None:
        """One accumulation group of examples: one optimizer step on it, or the stage's updates (PPO's rollout
        and epochs over its experience). A checkpoint is taken only between groups, where resume can start."""
        state, config = self.state, self.config
        saves_before = state.global_step // config.save_steps
        epoch = state.epoch + (state.batch_in_epoch + len(group)) / batches_in_epoch
        for micro_batches in self.stage.updates(self.model, group) if self.stage.updates else [group]:
            if state.global_step >= config.max_steps:
                break
            self.optimizer_step([self.stage.collate(examples) for examples in micro_batches], epoch)
        state.batch_in_epoch += len(group)
        state.groups_in_epoch += 1
        if state.global_step // config.save_steps > saves_before:
            self.save()

    def forward_backward(self, micro_batches: list[dict]) -> tuple[list[StepOutput], float]:
        """The gradients of an optimizer step's micro-batches; their StepOutputs, and the step's loss on this rank's
        data (its micro-batch means weighted by their shares, averaged)."""
        if self.pipeline is not None:
            return self.pipeline.forward_backward(micro_batches, self.data_parallel_size, self.summed_over_ranks,
                                                  self.scaler.scale)
        outputs, weighted_loss = [], 0.0
        for index, batch in enumerate(micro_batches):
            with gradient_sync(self.model, enabled=index == len(micro_batches) - 1):
                outputs.append(self.forward(batch))
                share = self.share_of_micro_batch(outputs[-1].weight)
                self.scaler.scale(outputs[-1].loss * share / len(micro_batches)).backward()
            weighted_loss += outputs[-1].loss.item() * share
        return outputs, weighted_loss / len(outputs)

    def clip_gradients(self) -> None:
        """Clip by the global norm of the gradients (over every pipeline stage's); max_grad_norm 0: no clipping
        (transformers' meaning)."""
        if self.config.max_grad_norm <= 0:
            return
        if self.pipeline is not None:
            self.pipeline.clip_grad_norm_(self.params, self.config.max_grad_norm)
        else:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)

    def optimizer_step(self, micro_batches: list[dict], epoch: float) -> None:
        outputs, loss_here = self.forward_backward(micro_batches)
        loss, tokens = self.summed_over_ranks(loss_here, sum(out.n_tokens for out in outputs))
        loss /= self.data_parallel_size
        self.check_finite(loss)
        self.scaler.unscale_(self.optimizer)
        self.clip_gradients()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.after_step is not None:
            self.after_step(self.state.global_step + 1)
        self.record_step(loss, outputs, int(tokens), epoch)

    def check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            last = latest_checkpoint(self.config.output_dir) or "none (none saved yet)"
            raise TrainingStopped(f"the loss became {loss} at step {self.state.global_step + 1}; training "
                                  f"stopped. The last good checkpoint is {last}")

    def record_step(self, loss: float, outputs: list[StepOutput], tokens: int, epoch: float) -> None:
        """Count an optimizer step taken: its loss and tokens logged, an evaluation when one is due."""
        state, config = self.state, self.config
        state.global_step += 1
        state.tokens_seen += tokens
        self.result.train_losses.append(loss)
        self.log.add_step(loss, outputs, tokens)
        if state.global_step % config.logging_steps == 0 or state.global_step == config.max_steps:
            self.log.write_window(state, self.scheduler.get_last_lr()[0], epoch, self.topology.device)
        if config.eval_strategy == "steps" and state.global_step % config.eval_steps == 0:
            self.evaluate()

    @property
    def data_parallel_size(self) -> int:
        """The ranks whose losses make one (dp x fsdp; a tensor-parallel group is one of them); 1 when the ranks
        train local models apart."""
        if not dist.is_initialized() or self.topology.apart:
            return 1
        return self.topology.data_parallel_size

    def summed_over_ranks(self, *values: float) -> list[float]:
        """Each value summed over the data-parallel ranks (as it is, in one process)."""
        if self.data_parallel_size == 1:
            return list(values)
        summed = torch.tensor(values, dtype=torch.float64, device=self.topology.device)
        dist.all_reduce(summed, group=self.topology.data_parallel_group)
        return summed.tolist()

    def share_of_micro_batch(self, weight: float) -> float:
        """What this rank's micro-batch mean weighs, so that the ranks' gradients, averaged by DDP or FSDP, are
        the gradient of the mean over the whole micro-batch: ranks x this rank's weight / all ranks' weight."""
        if self.data_parallel_size == 1:
            return 1.0
        (total,) = self.summed_over_ranks(weight)
        return self.data_parallel_size * weight / total if total > 0 else 1.0

    def evaluate(self) -> None:
        """Validation loss (and metrics); with load_best_model_at_end a new best is saved at once."""
        if not self.stage.eval:
            return
        if self.pipeline is not None:
            record = self.pipeline.evaluate(self.stage.eval, self.stage.collate)
        else:
            record = evaluate(self.model, self.forward, self.stage.eval, self.stage.collate,
                              self.config.eval_batch_size)
        self.result.eval_losses.append(record["eval_loss"])
        self.log.write({"step": self.state.global_step, **record})
        logger.info("step %d: eval_loss %.4f", self.state.global_step, record["eval_loss"])
        if self.config.load_best_model_at_end and self.state.is_new_best(record["eval_loss"]):
            self.save()

    def save(self) -> Path:
        extra = self.extra_state() if self.extra_state is not None else None
        return save_checkpoint(self.config.output_dir, self.state, self.model, self.optimizer, self.scheduler,
                               self.config.save_total_limit, self.topology, self.pipeline, extra)
