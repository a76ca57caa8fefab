"""The frozen reference model of DPO, KTO and PPO, in the cheapest form the run allows.

- LoRA without modules_to_save: the policy itself with its adapters switched off (one base model in memory).
- `ref_model` given (with `ref_model_adapters` merged): that model, frozen.
- Otherwise (full or freeze tuning, or LoRA that also trains whole modules): a frozen copy of the starting
  model, taken before any weight trains.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, TypeVar

import torch
from torch import nn

from danlu.tuning.lora import adapters_disabled
from danlu.utils.progress import logger

T = TypeVar("T")


class Reference:
    def __init__(self, frozen: Optional[nn.Module] = None):
        self.frozen = frozen  # None: the policy with its adapters off
        if frozen is not None:
            frozen.eval().requires_grad_(False)

    @torch.no_grad()
    def run(self, policy: nn.Module, compute: Callable[[nn.Module], T]) -> T:
        """compute(reference model), without gradients."""
        if self.frozen is not None:
            return compute(self.frozen)
        with adapters_disabled(policy):
            return compute(policy)


def build_reference(lm, args) -> Reference:
    """Called by a recipe before the finetuning method is applied, so that a copy is of the starting weights."""
    if args.ref_model:
        logger.info("reference model: %s", args.ref_model)
        return Reference(load_frozen(args.ref_model, args.names("ref_model_adapters"),
                                     args.ref_model_quantization_bit, next(lm.model.parameters()).device))
    if args.finetuning_type == "lora" and not args.additional_target:
        logger.info("reference model: the policy with its LoRA adapters disabled")
        return Reference()
    logger.info("reference model: a frozen copy of %s", lm.source)
    return Reference(quantized(copy.deepcopy(lm.model), args.ref_model_quantization_bit))


def load_frozen(path: str, adapters: list[str], quantization_bit: Optional[int], device) -> nn.Module:
    """Another model that only runs (a reference, a teacher): loaded in float32, its LoRA adapters merged,
    optionally quantized, frozen in eval mode."""
    from danlu.checkpoints.load import load_pretrained
    from danlu.tuning.lora import load_adapter, merge_lora

    model = load_pretrained(path, dtype="float32", device=device).model
    for adapter in adapters:
        load_adapter(model, adapter)
    if adapters:
        merge_lora(model)
    return quantized(model, quantization_bit).eval().requires_grad_(False)


def quantized(model: nn.Module, bits: Optional[int]) -> nn.Module:
    if bits is not None:
        from danlu.tuning.quantized import quantize_model

        quantize_model(model, bits)
    return model


