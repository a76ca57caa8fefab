"""`danlu train --parallel ps=K` under torchrun (K + 1 processes): a parameter server and K free-running workers.

Every process loads the model and builds the stage's recipe as any run does. Rank 0 is the server: it holds the
optimizer, the scheduler and the trainer state, applies the workers' gradients by `ps_update` (ssgd, asgd,
dcasgd-c, dcasgd-a: danlu/distributed/parameter_server/rules.py), clips them, and logs, evaluates, checkpoints
and saves as the one loop does (its bookkeeping is the loop's, loop._Run). Worker m reads its shard of every
epoch's order (m of K) and pushes one gradient per accumulation group, computed with the stage's step.

A step is one server update: one worker's group under asgd and dcasgd, one averaged round of every worker's
under ssgd; num_train_epochs counts them accordingly. An asynchronous run is not replayed exactly on resume: the
weights, optimizer, scheduler, step count and dcasgd-a's mean square are restored, each worker goes on with the
group after the last one the server had applied from it (a gradient in flight at the save is computed again),
and DC-ASGD's per-worker backups are set by the workers' next pulls. With one worker the resumed run is the run
that did not stop; with several, the interleaving of their pushes differs.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Iterator, Optional

import torch

from danlu.distributed.parameter_server.run import ServerSettings, run_parameter_server
from danlu.distributed.parameter_server.server import ParameterServer, Push
from danlu.training.arguments import TrainArguments
from danlu.training.checkpoint import load_extra_state
from danlu.training.finetuning import save_final
from danlu.training.logs import TrainingLog
from danlu.training.loop import _Run, forward_step
from danlu.training.optim import build_optimizer
from danlu.training.order import epoch_plan, steps_for_epochs
from danlu.training.schedule import build_scheduler, warmup_steps
from danlu.training.stage import Stage, StepOutput
from danlu.training.topology import Topology
from danlu.tuning.lora import count_trainable
from danlu.utils.progress import logger


def train_on_parameter_server(args: TrainArguments, topology: Topology, resume_from: Optional[Path]):
    from danlu.training.train import TrainResult, autocast_dtype, fit_config, prepare_run

    workers = topology.world_size - 1
    lm, stage = prepare_run(args, topology)
    model = lm.model
    trainable, total = count_trainable(model)
    max_steps = server_updates(args, len(stage.train), workers)
    settings = ServerSettings(max_updates=max_steps, rule=args.ps_update, dc_lambda=args.dc_lambda,
                              dc_momentum=args.dc_momentum, delay=args.ps_delay,
                              worker_timeout=args.ps_worker_timeout, max_grad_norm=args.max_grad_norm)
    if topology.is_main:
        logger.info("parameter server: %d workers, %s, %d updates", workers, args.ps_update, max_steps)
        optimizer = build_optimizer(model, args.optim, args.learning_rate, args.weight_decay,
                                    (args.adam_beta1, args.adam_beta2), args.adam_epsilon, args.sgd_momentum)
        scheduler = build_scheduler(optimizer, args.lr_scheduler_type,
                                    warmup_steps(max_steps, args.warmup_steps, args.warmup_ratio), max_steps)
        log = TrainingLog(Path(args.output_dir), args.report_to, resume_from is not None, True,
                          args.include_num_input_tokens_seen)
        config = fit_config(args, max_steps, resume_from, log, Topology(device=topology.device),
                            args.gradient_accumulation_steps)
        run = _Run(model, stage, optimizer, scheduler, config, Topology(device=topology.device))
        examples_per_push = args.per_device_train_batch_size * args.gradient_accumulation_steps
        bookkeeping = ServerBookkeeping(run, len(stage.train), examples_per_push)
        try:
            server = run_parameter_server(0, topology.world_size, model, settings, lambda m: (optimizer, scheduler),
                                          None, None, on_update=bookkeeping, version=run.state.global_step,
                                          prepare_server=lambda server: keep_server_state(server, run, resume_from))
        except KeyboardInterrupt:
            logger.info("interrupted: saved %s; resume with --resume_from_checkpoint latest", run.save())
            raise
        finally:
            run.log.close_progress()
        logger.info("parameter server: %s", describe(server))
        bookkeeping.finish()
        save_final(model, lm, args, Path(args.output_dir))
        log.finish(args.plot_loss)
        result = run.result
        return TrainResult(result.state, result.train_losses, result.eval_losses, Path(args.output_dir), trainable,
                           total)
    autocast = autocast_dtype(args, topology.device)
    consumed = groups_consumed(resume_from, topology.rank - 1)

    def gradient_of(model, group: list[list]) -> tuple[float, int]:
        loss, tokens = 0.0, 0
        for examples in group:
            out = forward_step(stage, model, stage.collate(examples), topology.device, autocast)
            (out.loss / len(group)).backward()
            loss, tokens = loss + out.loss.item() / len(group), tokens + out.n_tokens
        return loss, tokens

    run_parameter_server(topology.rank, topology.world_size, model, settings, None,
                         lambda m: worker_groups(stage, args, m, workers, consumed), gradient_of)
    return TrainResult(None, output_dir=Path(args.output_dir), trainable_parameters=trainable, all_parameters=total)


APPLIED_FROM = "ps.applied_from"  # the extra state's count of gradients applied from each worker


def keep_server_state(server: ParameterServer, run: _Run, resume_from: Optional[Path]) -> None:
    """Into every checkpoint: how many gradients each worker had applied (a resumed worker goes on with its next
    group) and dcasgd-a's mean square; back from the checkpoint on resume. DC-ASGD's per-worker backups are not
    kept: they belong to gradients in flight, and a worker's next pull sets them."""
    def state() -> dict:
        extra = {APPLIED_FROM: torch.tensor(server.applied_from, dtype=torch.int64)}
        if server.compensation is not None:
            extra.update(server.compensation.state_dict())
        return extra

    run.extra_state = state
    if resume_from is None:
        return
    saved = load_extra_state(resume_from)
    if APPLIED_FROM in saved and len(saved[APPLIED_FROM]) == server.workers:
        server.applied_from = [int(n) for n in saved.pop(APPLIED_FROM)]
    saved.pop(APPLIED_FROM, None)
    if server.compensation is not None:
        server.compensation.load_state_dict(saved)


def server_updates(args: TrainArguments, n_examples: int, workers: int) -> int:
    """max_steps, or the updates num_train_epochs make: each worker reads 1/K of an epoch; an update is one
    worker's accumulation group (asgd, dcasgd) or one round of all K (ssgd)."""
    if args.max_steps > 0:
        return args.max_steps
    per_worker = steps_for_epochs(n_examples, args.num_train_epochs, args.per_device_train_batch_size,
                                  args.gradient_accumulation_steps, Topology(world_size=workers))
    return per_worker if args.ps_update == "ssgd" else per_worker * workers


def groups_consumed(resume_from: Optional[Path], worker: int) -> int:
    """How many of its accumulation groups worker `worker` had had applied when the checkpoint was saved (0 for a
    fresh run): a resumed worker goes on with the next."""
    if resume_from is None:
        return 0
    applied = load_extra_state(resume_from).get(APPLIED_FROM)
    return 0 if applied is None or worker >= len(applied) else int(applied[worker])


def worker_groups(stage: Stage, args: TrainArguments, worker: int, workers: int, skip: int = 0) -> Iterator:
    """Worker `worker`'s accumulation groups of examples, epoch after epoch, without end (after the first `skip`)."""
    shard = Topology(rank=worker, world_size=workers)
    for epoch in itertools.count():
        groups, _ = epoch_plan(len(stage.train), args.seed, epoch, args.per_device_train_batch_size,
                               args.gradient_accumulation_steps, shard, args.shuffle)
        if skip >= len(groups):
            skip -= len(groups)
            continue
        for group in groups[skip:]:
            yield [[stage.train[i] for i in batch] for batch in group]
        skip = 0


class ServerBookkeeping:
    """After each server update, what the one loop does after an optimizer step: count it, log its loss and
    tokens, evaluate and checkpoint when due (under the server's lock: the workers wait meanwhile)."""

    def __init__(self, run: _Run, n_examples: int, examples_per_push: int):
        self.run, self.n_examples, self.examples_per_push = run, n_examples, examples_per_push
        self.first_epoch = run.state.epoch
        self.pushed = 0

    def __call__(self, version: int, pushes: list[Push]) -> None:
        run, state, config = self.run, self.run.state, self.run.config
        loss = sum(push.loss for push in pushes) / len(pushes)
        run.check_finite(loss)
        epochs_before = self.epochs_read()
        self.pushed += len(pushes)
        state.epoch = math.floor(self.epochs_read())
        delay = sum(push.delay for push in pushes) / len(pushes)
        tokens = sum(push.n_tokens for push in pushes)
        run.record_step(loss, [StepOutput(torch.tensor(loss), tokens, {"ps_delay": delay})], tokens,
                        self.epochs_read())
        if state.global_step % config.save_steps == 0:
            run.save()
        if config.eval_strategy == "epoch" and math.floor(self.epochs_read()) > math.floor(epochs_before):
            run.evaluate()

    def epochs_read(self) -> float:
        return self.first_epoch + self.pushed * self.examples_per_push / max(self.n_examples, 1)

    def finish(self) -> None:
        """The end of the run, as fit ends one: a last evaluation when due, the final checkpoint, the best loaded."""
        run, config = self.run, self.run.config
        if config.eval_strategy != "no" and (not run.result.eval_losses or run.state.global_step % config.eval_steps):
            run.evaluate()
        run.save()
        if config.load_best_model_at_end and run.state.best_checkpoint:
            from danlu.training.checkpoint import load_best

            load_best(run.model, config.output_dir, run.state)


def describe(server: ParameterServer) -> str:
    delays = [push.delay for push in server.pushes]
    return (f"{len(server.pushes)} gradients, mean delay {sum(delays) / max(len(delays), 1):.2f} updates "
            f"(max {max(delays, default=0)})")
