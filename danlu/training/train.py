"""`train(args)`: a whole run from TrainArguments: model, stage recipe, finetuning method, `fit`, final save.

Under torchrun (WORLD_SIZE > 1) the run first joins the process group and lays the ranks out as the
--parallel layout says; the parallelism (tensor parallel, then data parallel) is applied after the finetuning
method (so that LoRA's adapters are what is split, replicated or sharded) and before the optimizer is built (so
that it holds the shards). The ranks of one tensor-parallel group read the same examples: the data is sharded,
and the loss summed, over the dp x fsdp ranks only.
"""
from __future__ import annotations

import logging
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from danlu.checkpoints.load import load_config, load_pretrained
from danlu.distributed.full_state import whole_parameters
from danlu.distributed.layout import ParallelLayout
from danlu.distributed.mesh import data_parallel_mesh, distributed
from danlu.distributed.parallelize import check_layout, parallelize
from danlu.training.arguments import ArgumentError, TrainArguments
from danlu.training.checkpoint import latest_checkpoint
from danlu.training.finetuning import apply_finetuning, save_final
from danlu.training.logs import TrainingLog
from danlu.training.loop import FitConfig, FitResult, fit
from danlu.training.optim import build_optimizer
from danlu.training.order import steps_for_epochs
from danlu.training.recipes import RECIPES
from danlu.training.schedule import build_scheduler, warmup_steps
from danlu.training.topology import Topology
from danlu.tuning.lora import count_trainable
from danlu.utils.progress import logger

# What a run writes at the root of output_dir (besides checkpoint-N), removed by overwrite_output_dir.
RUN_OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", "config.json", "generation_config.json",
               "model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "tokenizer*",
               "special_tokens_map.json", "chat_template.jinja", "trainer_log.jsonl", "training_loss.png",
               "eval_loss.png", "train_args.json", "runs", "value_head.safetensors", "classifier.safetensors",
               "classifier.json")


@dataclass
class TrainResult(FitResult):
    output_dir: Optional[Path] = None
    trainable_parameters: int = 0
    all_parameters: int = 0


def train(args: TrainArguments) -> TrainResult:
    topology = Topology.from_environment()
    if not topology.is_main:
        logger.setLevel(logging.WARNING)  # the main rank reports the run; the others only their problems
    layout = args.parallel_layout(topology.world_size)
    if layout.pp > 1:
        raise ArgumentError(f"parallel {layout}: pipeline parallel is not implemented yet; use dp, fsdp and tp")
    if layout.tp > 1:
        check_model_layout(args, layout)
    # every rank checks output_dir before any writes to it (joining the process group waits for them all)
    resume_from = resume_point(args, Path(args.output_dir), remove_old_outputs=topology.is_main)
    if topology.world_size == 1:
        return train_in(args, topology, resume_from)
    with distributed(layout, topology.device, args.ddp_backend, args.ddp_timeout) as mesh:
        logger.info("parallel layout %s over %d processes", layout, topology.world_size)
        data = data_parallel_mesh(mesh)
        topology = replace(topology, data_parallel_rank=data.get_local_rank(), data_parallel_size=data.size(),
                           data_parallel_group=data.get_group())
        return train_in(args, topology, resume_from, lambda model: parallelize(
            model, mesh, layout, bool(args.ddp_find_unused_parameters)))


def check_model_layout(args: TrainArguments, layout: ParallelLayout) -> None:
    """Refuse, before any work, a layout the model's sizes do not allow (tp not dividing its heads, ...): its
    config is read without the weights."""
    if args.quantization_bit is not None:
        raise ArgumentError(f"parallel {layout}: tensor parallel does not shard quantized base weights yet "
                            f"(quantization_bit={args.quantization_bit}); use LoRA without quantization, or dp")
    config = load_config(args.model_name_or_path)
    try:
        check_layout(config, layout)
    except ValueError as e:
        raise ArgumentError(f"parallel {layout}: {args.model_name_or_path or 'the bundled model'}: {e}") from e


def train_in(args: TrainArguments, topology: Topology, resume_from: Optional[Path],
             apply_layout=None) -> TrainResult:
    """The run in this process; `apply_layout(model)` (when given) applies the parallel layout."""
    output_dir = Path(args.output_dir)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    lm = load_pretrained(args.model_name_or_path, dtype="float32", device=topology.device,
                         show_progress=topology.is_main)
    if lm.tokenizer is None:
        raise ArgumentError(f"{lm.source} has no tokenizer; training needs a checkpoint with one")
    if args.train_from_scratch:
        lm.model.init_weights()
    stage = RECIPES[args.stage](lm, args)
    model = lm.model
    apply_finetuning(model, args, stage.trained_modules)
    trainable, total = count_trainable(model)
    logger.info("trainable params: %d || all params: %d || trainable%%: %.4f", trainable, total,
                100 * trainable / total)
    if apply_layout is not None:
        apply_layout(model)
    optimizer = build_optimizer(model, args.optim, args.learning_rate, args.weight_decay,
                                (args.adam_beta1, args.adam_beta2), args.adam_epsilon, args.sgd_momentum)
    # PPO counts its steps as LLaMA-Factory does: one per rollout of ppo_buffer_size groups of prompts
    accumulation = args.gradient_accumulation_steps * (args.ppo_buffer_size if stage.updates else 1)
    groups = args.max_steps if args.max_steps > 0 else steps_for_epochs(
        len(stage.train), args.num_train_epochs, args.per_device_train_batch_size, accumulation, topology)
    max_steps = groups * stage.updates_per_group
    scheduler = build_scheduler(optimizer, args.lr_scheduler_type,
                                warmup_steps(max_steps, args.warmup_steps, args.warmup_ratio), max_steps)
    log = TrainingLog(output_dir, args.report_to, resume_from is not None, topology.is_main,
                      args.include_num_input_tokens_seen)
    config = fit_config(args, max_steps, resume_from, log, topology, accumulation, stage.updates_per_group)
    result = fit(model, stage, optimizer, scheduler, config, topology)
    for name in stage.dropped_modules:
        delattr(model, name)
    with whole_parameters(model):
        if topology.is_main:
            save_final(model, lm, args, output_dir)
    log.finish(args.plot_loss)
    return TrainResult(result.state, result.train_losses, result.eval_losses, output_dir, trainable, total)


def fit_config(args: TrainArguments, max_steps: int, resume_from, log, topology: Topology, accumulation: int,
               updates_per_group: int = 1) -> FitConfig:
    """`updates_per_group` optimizer steps make one of the user's steps (PPO), so the step counts scale."""
    return FitConfig(
        output_dir=Path(args.output_dir), max_steps=max_steps, batch_size=args.per_device_train_batch_size,
        eval_batch_size=args.per_device_eval_batch_size, gradient_accumulation_steps=accumulation,
        max_grad_norm=args.max_grad_norm, logging_steps=args.logging_steps * updates_per_group,
        save_steps=args.save_steps * updates_per_group, eval_strategy=args.eval_strategy,
        eval_steps=args.eval_steps * updates_per_group, save_total_limit=args.save_total_limit,
        load_best_model_at_end=args.load_best_model_at_end, seed=args.seed,
        autocast_dtype=autocast_dtype(args, topology.device), resume_from=resume_from, log=log)


def resume_point(args: TrainArguments, output_dir: Path, remove_old_outputs: bool = True) -> Optional[Path]:
    """The checkpoint to continue from; refuses to train over an earlier run unless asked to (overwrite_output_dir:
    then the earlier run's outputs are removed, by one rank only)."""
    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint.lower() in ("true", "latest"):
            found = latest_checkpoint(output_dir)
            if found is None:
                raise ArgumentError(f"resume_from_checkpoint: no complete checkpoint in {output_dir}")
            return found
        path = Path(args.resume_from_checkpoint)
        if not (path / "trainer_state.json").is_file():
            raise ArgumentError(f"resume_from_checkpoint: {path} is not a complete checkpoint "
                                f"(no trainer_state.json)")
        return path
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite_output_dir:
        raise ArgumentError(f"output_dir {output_dir} already holds a run; pass --overwrite_output_dir True to "
                            f"replace it or --resume_from_checkpoint to continue it")
    if output_dir.exists() and args.overwrite_output_dir and remove_old_outputs:
        for pattern in ("checkpoint-*", *RUN_OUTPUTS):
            for old in output_dir.glob(pattern):
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    return None


def autocast_dtype(args: TrainArguments, device: torch.device) -> Optional[torch.dtype]:
    if args.fp16:
        if device.type != "cuda":
            logger.warning("fp16 needs a GPU; training in float32 on the CPU instead")
            return None
        return torch.float16
    if args.bf16:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            logger.warning("this GPU has no bf16; training in float32 instead")
            return None
        return torch.bfloat16
    if args.flash_attn == "fa2" and device.type != "cuda":
        logger.warning("flash attention needs a GPU; using PyTorch's scaled_dot_product_attention on the CPU")
    return None
