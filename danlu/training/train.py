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
from danlu.distributed.pipeline_parallel import PipelineSettings
from danlu.training.arguments import ArgumentError, TrainArguments
from danlu.training.checkpoint import latest_checkpoint, remove_stale_checkpoint_writes
from danlu.training.finetuning import apply_finetuning, save_final
from danlu.training.logs import TrainingLog
from danlu.training.loop import FitConfig, FitResult, fit
from danlu.training.optim import build_optimizer
from danlu.training.order import steps_for_epochs
from danlu.training.recipes import RECIPES
from danlu.training.recipes.pt import pad_id
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
        check_pipeline_run(args, layout)
    if layout.tp > 1 or layout.pp > 1:
        check_model_layout(args, layout)
    # every rank checks output_dir before any writes to it (joining the process group waits for them all)
    resume_from = resume_point(args, Path(args.output_dir), remove_old_outputs=topology.is_main)
    if layout.ps:
        from danlu.training.on_parameter_server import train_on_parameter_server

        return train_on_parameter_server(args, topology, resume_from)
    if layout.local:
        from danlu.training.local_models import train_local_models

        return train_local_models(args, topology, resume_from)
    if topology.world_size == 1:
        return train_in(args, topology, resume_from)
    with distributed(layout, topology.device, args.ddp_backend, args.ddp_timeout) as mesh:
        logger.info("parallel layout %s over %d processes", layout, topology.world_size)
        data = data_parallel_mesh(mesh)
        topology = replace(topology, data_parallel_rank=data.get_local_rank(), data_parallel_size=data.size(),
                           data_parallel_group=data.get_group())
        return train_in(args, topology, resume_from, lambda model, pad_id: parallelize(
            model, mesh, layout, bool(args.ddp_find_unused_parameters), pipeline_settings(args, pad_id)))


def check_model_layout(args: TrainArguments, layout: ParallelLayout) -> None:
    """Refuse, before any work, a layout the model's sizes do not allow (tp not dividing its heads, more pipeline
    stages than layers, ...): its config is read without the weights."""
    if args.quantization_bit is not None:
        raise ArgumentError(f"parallel {layout}: tensor and pipeline parallel do not take quantized base weights "
                            f"yet (quantization_bit={args.quantization_bit}); use LoRA without quantization, or dp")
    config = load_config(args.model_name_or_path)
    try:
        check_layout(config, layout, pipeline_settings(args))
    except ValueError as e:
        raise ArgumentError(f"parallel {layout}: {args.model_name_or_path or 'the bundled model'}: {e}") from e


# What runs on a pipeline: stages whose loss is the next-token cross-entropy of one forward pass
PIPELINE_STAGES = ("pt", "sft")


def check_pipeline_run(args: TrainArguments, layout: ParallelLayout) -> None:
    """Refuse, before any work, what pipeline parallel does not run (yet), naming it."""
    refused = [(args.stage not in PIPELINE_STAGES, f"stage {args.stage} (pp runs {', '.join(PIPELINE_STAGES)})"),
               (args.packing, "packing (the stages do not pass the packed documents' boundaries on)")]
    for bad, what in refused:
        if bad:
            raise ArgumentError(f"parallel {layout}: pipeline parallel does not run {what} yet")
    if args.pipeline_schedule == "1f1b" and args.gradient_accumulation_steps < layout.pp:
        raise ArgumentError(f"parallel {layout}: pipeline_schedule 1f1b needs at least as many micro-batches "
                            f"(gradient_accumulation_steps, {args.gradient_accumulation_steps}) as stages (pp, "
                            f"{layout.pp}); raise gradient_accumulation_steps or use --pipeline_schedule gpipe")


def pipeline_settings(args: TrainArguments, pad_id: int = 0) -> PipelineSettings:
    return PipelineSettings(args.pipeline_schedule, args.gradient_accumulation_steps,
                            args.per_device_train_batch_size, args.cutoff_len, pad_id,
                            args.pipeline_first_stage_layers, args.pipeline_last_stage_layers)


def train_in(args: TrainArguments, topology: Topology, resume_from: Optional[Path],
             apply_layout=None, apart=None) -> TrainResult:
    """The run in this process; `apply_layout(model, pad_id)` (when given) applies the parallel layout, and returns
    the Pipeline when the layout has pipeline stages. `apart` (local_models.LocalModels): the workers train local
    models, which it aggregates."""
    output_dir = Path(args.output_dir)
    lm, stage = prepare_run(args, topology)
    model = lm.model
    if apart is not None:
        stage = apart.stage(model, stage)
    trainable, total = count_trainable(model)
    pipeline = apply_layout(model, pad_id(lm.tokenizer)) if apply_layout is not None else None
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
    result = fit(model, stage, optimizer, scheduler, config, topology, pipeline,
                 apart.after_step if apart is not None else None)
    if apart is not None:
        apart.finish(result.state.global_step)
    for name in stage.dropped_modules:
        delattr(model, name)
    if pipeline is not None:  # the main rank holds the first stage: it puts the whole model together
        whole = pipeline.whole_model(lambda whole: apply_finetuning(whole, args, stage.trained_modules))
        if topology.is_main:
            save_final(whole, lm, args, output_dir)
    else:
        with whole_parameters(model):
            if topology.is_main:
                save_final(model, lm, args, output_dir)
    log.finish(args.plot_loss)
    return TrainResult(result.state, result.train_losses, result.eval_losses, output_dir, trainable, total)


def prepare_run(args: TrainArguments, topology: Topology):
    """The model (loaded, finetuning method applied) and the stage's recipe: (lm, stage)."""
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    lm = load_pretrained(args.model_name_or_path, dtype="float32", device=topology.device,
                         show_progress=topology.is_main)
    if lm.tokenizer is None:
        raise ArgumentError(f"{lm.source} has no tokenizer; training needs a checkpoint with one")
    if args.train_from_scratch:
        lm.model.init_weights()
    stage = RECIPES[args.stage](lm, args)
    apply_finetuning(lm.model, args, stage.trained_modules)
    trainable, total = count_trainable(lm.model)
    logger.info("trainable params: %d || all params: %d || trainable%%: %.4f", trainable, total,
                100 * trainable / total)
    return lm, stage


def fit_config(args: TrainArguments, max_steps: int, resume_from, log, topology: Topology, accumulation: int,
               updates_per_group: int = 1) -> FitConfig:
    """`updates_per_group` optimizer steps make one of the user's steps (PPO), so the step counts scale."""
    return FitConfig(
        output_dir=Path(args.output_dir), max_steps=max_steps, batch_size=args.per_device_train_batch_size,
        eval_batch_size=args.per_device_eval_batch_size, gradient_accumulation_steps=accumulation,
        max_grad_norm=args.max_grad_norm, logging_steps=args.logging_steps * updates_per_group,
        save_steps=args.save_steps * updates_per_group, eval_strategy=args.eval_strategy,
        eval_steps=args.eval_steps * updates_per_group, save_total_limit=args.save_total_limit,
        load_best_model_at_end=args.load_best_model_at_end, seed=args.seed, shuffle=args.shuffle,
        autocast_dtype=autocast_dtype(args, topology.device), resume_from=resume_from, log=log)


# Under torchrun each rank notes in output_dir/.torchrun/rank-R the torchrun it runs under (the job's id, the host,
# torchrun's pid). A rank that finds its own note is a restart of that job by torchrun (--max-restarts): the outputs
# there are its earlier attempt's, to resume from or replace, not an earlier run's, which it must refuse to touch as
# the first attempt did. TORCHELASTIC_RESTART_COUNT cannot tell: torchrun restarts the workers of a node whose own
# did not fail without counting it, so a restart can see 0 there.
TORCHRUN_NOTES = ".torchrun"


def torchrun_note(output_dir: Path) -> tuple[Optional[Path], str]:
    """This rank's note in output_dir and what it says under this torchrun; (None, "") outside torchrun."""
    import os
    import socket

    job = os.environ.get("TORCHELASTIC_RUN_ID")
    if job is None:
        return None, ""
    rank = os.environ.get("RANK", "0")
    return output_dir / TORCHRUN_NOTES / f"rank-{rank}", f"{job} {socket.gethostname()} {os.getppid()}"


def resume_point(args: TrainArguments, output_dir: Path, remove_old_outputs: bool = True) -> Optional[Path]:
    """The checkpoint to continue from; refuses to train over an earlier run unless asked to (overwrite_output_dir:
    then the earlier run's outputs are removed, by one rank only).

    A restart by torchrun (--max-restarts) of the job that started in output_dir resumes from the latest complete
    checkpoint there, whatever the first attempt was asked (overwrite_output_dir never removes the checkpoints a
    restart continues from); with none, it starts as the first attempt did (a fresh start removes that attempt's
    outputs). The temporary directories of the writes the failure cut short are removed."""
    note, this_torchrun = torchrun_note(output_dir)
    restart = note is not None and note.is_file() and note.read_text(encoding="utf-8") == this_torchrun
    if remove_old_outputs:
        remove_stale_checkpoint_writes(output_dir)
    found = latest_checkpoint(output_dir) if restart else None
    if found is not None:
        logger.info("torchrun restarted the job: resuming from %s", found)
    elif restart:
        logger.info("torchrun restarted the job: no complete checkpoint in %s; starting as the first attempt did",
                    output_dir)
    if found is None and args.resume_from_checkpoint:
        if args.resume_from_checkpoint.lower() in ("true", "latest"):
            found = latest_checkpoint(output_dir)
            if found is None:
                raise ArgumentError(f"resume_from_checkpoint: no complete checkpoint in {output_dir}")
        else:
            found = Path(args.resume_from_checkpoint)
            if not (found / "trainer_state.json").is_file():
                raise ArgumentError(f"resume_from_checkpoint: {found} is not a complete checkpoint "
                                    f"(no trainer_state.json)")
    elif found is None:
        holds_a_run = output_dir.exists() and any(p.name != TORCHRUN_NOTES for p in output_dir.iterdir())
        if holds_a_run and not (args.overwrite_output_dir or restart):
            raise ArgumentError(f"output_dir {output_dir} already holds a run; pass --overwrite_output_dir True to "
                                f"replace it or --resume_from_checkpoint to continue it")
        if holds_a_run and remove_old_outputs:
            for pattern in ("checkpoint-*", *RUN_OUTPUTS):
                for old in output_dir.glob(pattern):
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
    if note is not None:
        note.parent.mkdir(parents=True, exist_ok=True)
        note.write_text(this_torchrun, encoding="utf-8")
    elif remove_old_outputs and (output_dir / TORCHRUN_NOTES).is_dir():  # a run outside torchrun: no job owns it now
        shutil.rmtree(output_dir / TORCHRUN_NOTES)
    return found


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
