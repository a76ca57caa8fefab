"""The training loop: read it top to bottom. `train(args)` runs a whole fine-tune from TrainArguments."""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from danlu.checkpoints.adapters import save_peft_adapter
from danlu.checkpoints.hf import save_hf_checkpoint
from danlu.checkpoints.load import Pretrained, load_pretrained
from danlu.data.collate import causal_lm_loss, collate
from danlu.checkpoints.bundled import danlu_home
from danlu.data.dataset import PreparedData, prepare_sft_data
from danlu.data.pretrain import prepare_pretrain_data
from danlu.data.supervised import pack_examples
from danlu.training.arguments import ArgumentError, TrainArguments
from danlu.training.checkpoint import (TrainerState, latest_checkpoint, load_checkpoint,
                                       save_checkpoint)
from danlu.training.gradient_checkpointing import enable_gradient_checkpointing
from danlu.training.logs import TrainingLog, memory_gib
from danlu.training.schedule import build_scheduler, warmup_steps
from danlu.tuning.freeze import apply_freeze
from danlu.tuning.quantized import quantize_model
from danlu.tuning.lora import LoRAConfig, apply_lora, base_state_dict, count_trainable, lora_state_dict
from danlu.utils.progress import logger, progress


class TrainingStopped(RuntimeError):
    """Training stopped early (NaN loss); the last good checkpoint is kept."""


@dataclass
class TrainResult:
    state: TrainerState
    output_dir: Path
    train_losses: list[float] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    trainable_parameters: int = 0
    all_parameters: int = 0


def train(args: TrainArguments) -> TrainResult:
    output_dir = Path(args.output_dir)
    resume_from = _resume_point(args, output_dir)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast_dtype = _autocast_dtype(args, device)
    lm = load_pretrained(args.model_name_or_path, dtype="float32", device=device, show_progress=True)
    if lm.tokenizer is None:
        raise ArgumentError(f"{lm.source} has no tokenizer; training needs a checkpoint with one")
    data = _prepare_data(lm.tokenizer, args)
    _report_data(data, args)
    model = lm.model
    trainable_names = _prepare_model(model, args)
    trainable, total = count_trainable(model)
    logger.info("trainable params: %d || all params: %d || trainable%%: %.4f", trainable, total,
                100 * trainable / total)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, args)
    # fp16 gradients underflow without loss scaling; bf16 and float32 need none (the scaler is then a no-op)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    batches_per_epoch = math.ceil(len(data.train) / args.per_device_train_batch_size)
    steps_per_epoch = max(1, batches_per_epoch // args.gradient_accumulation_steps)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(steps_per_epoch * args.num_train_epochs)
    scheduler = build_scheduler(optimizer, args.lr_scheduler_type,
                                warmup_steps(total_steps, args.warmup_steps, args.warmup_ratio), total_steps)
    state = TrainerState()
    if resume_from is not None:
        state, saved = load_checkpoint(resume_from, optimizer, scheduler)
        _load_trainable(model, saved, trainable_names)
        logger.info("resumed from %s at step %d", resume_from, state.global_step)
    log = TrainingLog(output_dir, args.report_to, resume=resume_from is not None)
    result = TrainResult(state, output_dir, trainable_parameters=trainable, all_parameters=total)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    model.train()
    bar = progress(total=total_steps, desc="Training", unit="step")
    bar.update(state.global_step)
    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    try:
        while state.global_step < total_steps:
            order = _epoch_order(len(data.train), args.seed, state.epoch)
            batch_starts = list(range(0, len(order), args.per_device_train_batch_size))
            groups = [batch_starts[i:i + args.gradient_accumulation_steps]
                      for i in range(0, len(batch_starts), args.gradient_accumulation_steps)]
            groups = [g for g in groups if len(g) == args.gradient_accumulation_steps] or groups[:1]
            for group in groups[state.batch_in_epoch // args.gradient_accumulation_steps:]:
                if state.global_step >= total_steps:
                    break
                step_loss, step_tokens = 0.0, 0
                for start in group:
                    batch = collate([data.train[i] for i in order[start:start + args.per_device_train_batch_size]],
                                    pad_id)
                    batch = {k: v.to(device) for k, v in batch.items()}
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                                       document_ids=batch.get("document_ids"))
                    loss, _ = causal_lm_loss(logits, batch["labels"])
                    scaler.scale(loss / len(group)).backward()
                    step_loss += loss.item() / len(group)
                    step_tokens += int(batch["attention_mask"].sum())
                if not math.isfinite(step_loss):
                    last = latest_checkpoint(output_dir)
                    raise TrainingStopped(f"the loss became {step_loss} at step {state.global_step + 1}; training "
                                          f"stopped. The last good checkpoint is {last or 'none (none saved yet)'}")
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.global_step += 1
                state.batch_in_epoch += len(group)
                state.tokens_seen += step_tokens
                result.train_losses.append(step_loss)
                window_loss += step_loss
                window_steps += 1
                window_tokens += step_tokens
                bar.update(1)
                if state.global_step % args.logging_steps == 0 or state.global_step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    record = {"step": state.global_step, "loss": window_loss / window_steps,
                              "lr": scheduler.get_last_lr()[0], "epoch": state.epoch + state.batch_in_epoch / len(batch_starts),
                              "tokens_per_s": window_tokens / max(elapsed, 1e-9), "memory_gib": memory_gib(device)}
                    if args.include_num_input_tokens_seen:
                        record["num_input_tokens_seen"] = state.tokens_seen
                    log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{record['tokens_per_s']:.0f}", mem=f"{record['memory_gib']:.2f}G")
                    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
                if data.eval and args.eval_strategy == "steps" and state.global_step % args.eval_steps == 0:
                    _evaluate_and_track(model, data, args, state, result, log, pad_id, device, autocast_dtype,
                                        optimizer, scheduler, trainable_names)
                if state.global_step % args.save_steps == 0:
                    save_checkpoint(output_dir, state, _trainable_state(model, trainable_names), optimizer,
                                    scheduler, args.save_total_limit)
            else:
                state.epoch += 1
                state.batch_in_epoch = 0
                if data.eval and args.eval_strategy == "epoch":
                    _evaluate_and_track(model, data, args, state, result, log, pad_id, device, autocast_dtype,
                                        optimizer, scheduler, trainable_names)
                continue
    except KeyboardInterrupt:
        bar.close()
        path = save_checkpoint(output_dir, state, _trainable_state(model, trainable_names), optimizer, scheduler)
        logger.info("interrupted: saved %s; resume with --resume_from_checkpoint %s", path, path)
        raise
    bar.close()
    if data.eval and args.eval_strategy != "no" and (not result.eval_losses or state.global_step % args.eval_steps):
        _evaluate_and_track(model, data, args, state, result, log, pad_id, device, autocast_dtype,
                                        optimizer, scheduler, trainable_names)
    save_checkpoint(output_dir, state, _trainable_state(model, trainable_names), optimizer, scheduler,
                    args.save_total_limit)
    if args.load_best_model_at_end and state.best_checkpoint:
        from safetensors.torch import load_file

        _load_trainable(model, load_file(str(output_dir / state.best_checkpoint / "trainable.safetensors")),
                        trainable_names)
        logger.info("loaded the best model (eval loss %.4f) from %s", state.best_eval_loss, state.best_checkpoint)
    _save_final(model, lm, args, output_dir)
    log.finish(args.plot_loss)
    return result


# ------------------------------------------------------------------ pieces of the loop


def _resume_point(args: TrainArguments, output_dir: Path) -> Optional[Path]:
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
    if output_dir.exists() and args.overwrite_output_dir:
        import shutil

        for old in [*output_dir.glob("checkpoint-*"), output_dir / "adapter", output_dir / "model"]:
            shutil.rmtree(old, ignore_errors=True)
        for old in ("trainer_log.jsonl", "training_loss.png", "eval_loss.png", "train_args.json"):
            (output_dir / old).unlink(missing_ok=True)
    return None


def _prepare_data(tokenizer, args: TrainArguments) -> PreparedData:
    if args.stage == "pt":
        train_blocks, eval_blocks = prepare_pretrain_data(tokenizer, args.dataset_dir, args.dataset_names,
                                                          args.cutoff_len, danlu_home() / "token-cache",
                                                          args.val_size, args.max_samples)
        return PreparedData(train_blocks, eval_blocks)
    data = prepare_sft_data(tokenizer, args.dataset_dir, args.dataset_names, args.template, args.cutoff_len,
                            args.max_samples, args.val_size, args.seed, args.train_on_prompt, args.skip_bad_lines)
    if args.packing:
        before = len(data.train)
        data.train = pack_examples(data.train, args.cutoff_len)
        logger.info("packing: %d examples in %d rows of at most %d tokens", before, len(data.train), args.cutoff_len)
    return data


def _autocast_dtype(args: TrainArguments, device: torch.device) -> Optional[torch.dtype]:
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


def _report_data(data: PreparedData, args: TrainArguments) -> None:
    if data.read.skipped:
        logger.warning("skipped %d bad line(s), first: %s", len(data.read.skipped), data.read.skipped[0])
    if data.tokenized.truncated:
        logger.info("%d example(s) longer than cutoff_len=%d were truncated", data.tokenized.truncated,
                    args.cutoff_len)
    if data.tokenized.dropped:
        logger.info("%d example(s) had no answer left within cutoff_len=%d and were dropped",
                    data.tokenized.dropped, args.cutoff_len)
    logger.info("training examples: %d, validation examples: %d", len(data.train), len(data.eval))


def _prepare_model(model, args: TrainArguments) -> list[str]:
    """Apply the finetuning type; returns the names of the parameters that train."""
    if args.finetuning_type == "lora":
        if args.quantization_bit is not None:  # QLoRA: frozen NF4 / int8 base weights under the adapters
            quantized = quantize_model(model, args.quantization_bit)
            logger.info("quantized %d linear layers to %d bits", len(quantized), args.quantization_bit)
        apply_lora(model, LoRAConfig(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets))
        if args.additional_target:
            for name, p in model.named_parameters():
                if any(f"{t}." in name or name.startswith(t) for t in args.additional_target.split(",")):
                    p.requires_grad_(True)
    elif args.finetuning_type == "freeze":
        apply_freeze(model, args.freeze_trainable_layers, args.freeze_trainable_modules)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _optimizer(params, args: TrainArguments):
    if args.optim == "sgd":
        return torch.optim.SGD(params, lr=args.learning_rate, momentum=args.sgd_momentum,
                               weight_decay=args.weight_decay)
    # fused: one kernel for all parameters instead of a loop of small ops (3x faster steps, same numbers)
    return torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon, weight_decay=args.weight_decay, fused=True)


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return order


def _trainable_state(model, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n] for n in names}


def _load_trainable(model, saved: dict[str, torch.Tensor], names: list[str]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in saved]
    if missing:
        raise ArgumentError(f"the checkpoint does not hold {missing[:3]}: it was saved by a different "
                            f"finetuning setup")
    with torch.no_grad():
        for n in names:
            params[n].copy_(saved[n])


@torch.no_grad()
def evaluate_loss(model, examples, batch_size: int, pad_id: int, device, autocast_dtype=None) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                           document_ids=batch.get("document_ids"))
        loss, n = causal_lm_loss(logits, batch["labels"])
        total += loss.item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _evaluate_and_track(model, data, args, state, result, log, pad_id, device, autocast_dtype,
                        optimizer, scheduler, trainable_names) -> None:
    """Validation loss; with load_best_model_at_end a new best is saved as a checkpoint at once."""
    loss = evaluate_loss(model, data.eval, args.per_device_eval_batch_size, pad_id, device, autocast_dtype)
    result.eval_losses.append(loss)
    log.write({"step": state.global_step, "eval_loss": loss})
    logger.info("step %d: eval_loss %.4f", state.global_step, loss)
    if args.load_best_model_at_end and (state.best_eval_loss is None or loss < state.best_eval_loss):
        state.best_eval_loss = loss
        state.best_checkpoint = f"checkpoint-{state.global_step}"
        save_checkpoint(Path(args.output_dir), state, _trainable_state(model, trainable_names), optimizer,
                        scheduler, args.save_total_limit)


def _save_final(model, lm: Pretrained, args: TrainArguments, output_dir: Path) -> None:
    if args.finetuning_type == "lora":
        state = lora_state_dict(model)
        modules = sorted({k.rsplit(".", 2)[0].split(".")[-1] for k in state})
        if args.additional_target:  # saved whole, as PEFT saves modules_to_save
            state.update({n.replace(".base_layer.", "."): p.detach() for n, p in model.named_parameters()
                          if p.requires_grad and ".lora_" not in n})
        save_peft_adapter(output_dir / "adapter", state, args.lora_rank, args.lora_alpha, args.lora_dropout,
                          modules, base_model=lm.source,
                          modules_to_save=args.additional_target.split(",") if args.additional_target else None)
        final = output_dir / "adapter"
    else:
        final = save_hf_checkpoint(base_state_dict(model), lm.config, output_dir / "model", torch.float32,
                                   tokenizer=lm.tokenizer, generation_config=lm.generation_defaults)
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(str(final))
    (output_dir / "train_args.json").write_text(json.dumps(vars(args), indent=2, default=str), encoding="utf-8")
    logger.info("saved %s", final)
