"""The finetuning method (LLaMA-Factory's finetuning_type): which weights train, and what the run leaves.

A run ends as LLaMA-Factory's (the Hugging Face Trainer's) does: the adapter in PEFT's format, or the full
model, at the root of output_dir beside its checkpoint-N directories, so LF's merge and inference YAMLs
(`adapter_name_or_path: saves/<model>/lora/sft`) point at it unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from danlu.checkpoints.hf import save_hf_checkpoint
from danlu.checkpoints.value_head import save_value_head, sequence_classification_head
from danlu.distillation.encoder_tasks import CLASSIFIER, save_classifier
from danlu.low_rank.checkpoint import low_rank_config, low_rank_ranks
from danlu.training.activation_checkpointing import apply_activation_checkpointing
from danlu.training.arguments import ArgumentError
from danlu.tuning.freeze import apply_freeze
from danlu.tuning.lora import LoRAConfig, apply_lora, base_state_dict, save_adapter
from danlu.tuning.quantized import quantize_model
from danlu.utils.atomic import atomic_files
from danlu.utils.progress import logger

ARGS_NAME = "train_args.json"
NEVER_QUANTIZED = ("lm_head", "v_head.summary")  # QLoRA keeps the head and a value head (which trains) in float


def lora_config(args) -> LoRAConfig:
    return LoRAConfig(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_target,
                      modules_to_save=args.additional_target)


def apply_finetuning(model, args, trained_modules: tuple[str, ...] = ()) -> None:
    """Make the method's weights trainable (and only those, with `trained_modules`, e.g. a value head, whatever
    the method); QLoRA quantizes the frozen base first. Then activation checkpointing, before the parallel
    layout (which keeps it: danlu.training.activation_checkpointing)."""
    if args.finetuning_type == "lora":
        refuse_lora_on_factorized(model)
        if args.quantization_bit is not None:
            quantized = quantize_model(model, args.quantization_bit, skip=NEVER_QUANTIZED)
            logger.info("quantized %d linear layers to %d bits", len(quantized), args.quantization_bit)
        apply_lora(model, lora_config(args))
    elif args.finetuning_type == "freeze":
        apply_freeze(model, args.freeze_trainable_layers, args.freeze_trainable_modules)
    else:
        model.requires_grad_(True)
    for name in trained_modules:
        model.get_submodule(name).requires_grad_(True)
    apply_activation_checkpointing(model, args.activation_checkpointing)


def refuse_lora_on_factorized(model) -> None:
    """LoRA targets layers by their names (q_proj, ..., 'all'), which a factorized layer's two factors no longer
    answer to: it would leave them out without a word."""
    factorized = list(low_rank_ranks(model))
    if factorized:
        raise ArgumentError(f"finetuning_type lora: {len(factorized)} linear layers of this model are factorized "
                            f"(danlu factorize; {factorized[0]}, ...) and LoRA does not adapt factorized layers; "
                            f"train their factors with --finetuning_type full (or freeze), or write the model "
                            f"with danlu factorize --dense and train LoRA on that")


def save_final(model, lm, args, output_dir: Path) -> Path:
    """The trained adapter or full model, with the tokenizer, at the root of output_dir; a value head (rm, ppo)
    beside it in value_head.safetensors, as LLaMA-Factory writes it. A full reward model also carries it as
    `score`, so that AutoModelForSequenceClassification loads the directory. An encoder's classifier head
    (kd --kd_task classification) goes beside the encoder in classifier.safetensors and classifier.json."""
    head = getattr(model, "v_head", None)
    classifier = getattr(model, CLASSIFIER, None)
    with atomic_files(output_dir) as staged:
        if args.finetuning_type == "lora":
            save_adapter(model, staged, lora_config(args), base_model=lm.source)
        else:
            state = {name: t for name, t in base_state_dict(model).items()
                     if not name.startswith(("v_head.", f"{CLASSIFIER}."))}
            extra_config = low_rank_config(model)  # a factorized model's layers and ranks; {} for a plain one
            if head is not None and args.stage == "rm":
                score, head_config = sequence_classification_head(head)
                extra_config.update(head_config)
                state.update(score)
                if lm.config.pad_token_id is None:  # the classifier finds each row's last token by it
                    extra_config["pad_token_id"] = lm.tokenizer.pad_token_id
            save_hf_checkpoint(state, lm.config, staged, torch.float32, generation_config=lm.generation_defaults,
                               extra_config=extra_config or None)
        if head is not None:
            save_value_head(head, staged)
        if classifier is not None:
            save_classifier(classifier, staged)
        lm.tokenizer.save_pretrained(str(staged))
        (staged / ARGS_NAME).write_text(json.dumps(vars(args), indent=2, default=str), encoding="utf-8")
    logger.info("saved the %s in %s", "adapter" if args.finetuning_type == "lora" else "model", output_dir)
    return output_dir
