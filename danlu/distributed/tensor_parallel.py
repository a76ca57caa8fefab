"""Tensor parallelism (Megatron-LM's layout) applied from outside the model with DTensor, as torchtitan's apply_tp.

`apply_tp(model, tp_mesh)` shards the modules by their role (danlu.models.roles):
* column linears (q/k/v/gate/up) split their output features (ColwiseParallel); each rank keeps whole heads,
  and attention takes its head counts from the tensors (transformer.split_heads), so it runs on its share;
* row linears (o/down) split their input features and sum the partial outputs (RowwiseParallel);
* vocab modules split the vocabulary: the embedding's partial lookups are summed, the head's logits gathered,
  or left sharded over the vocabulary for torch's `loss_parallel()` cross-entropy.

With sequence_parallel the residual stream between sublayers is split along the sequence, so the norms run on
1/tp of the tokens: each sublayer gathers the whole sequence on its way in, and its row linear reduce-scatters
on its way out.

Every module sees plain tensors, as without parallelism; every parameter becomes a DTensor, sharded or
replicated (clip_grad_norm_ and the optimizers' foreach paths refuse a mixture). Every rank must hold the
same full weights beforehand (as loaded from one checkpoint): most are scattered or broadcast from rank 0,
but the norms under SequenceParallel keep each rank's own copy.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from danlu.models.config import ModelConfig
from danlu.models.roles import COLUMN, ROW, VOCAB, modules_with_role, role_of
from danlu.models.transformer import RMSNorm
from danlu.tuning.lora import LoRALinear

# What each rank must hold an equal share of: whole query heads, whole key/value heads, MLP columns.
DIVIDED_SIZES = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
NORMS = (RMSNorm, nn.LayerNorm)


def check_tp(config: ModelConfig, tp: int, vocab_parallel: bool = True) -> None:
    """Raise ValueError unless `tp` ranks can each hold an equal share of the heads, the MLP width and (with
    vocab_parallel) the vocabulary; the message names every size that does not divide."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    sizes = DIVIDED_SIZES + (("vocab_size",) if vocab_parallel else ())
    undivided = [f"{size}={getattr(config, size)}" for size in sizes if getattr(config, size) % tp]
    if undivided:
        raise ValueError(f"tp={tp} does not divide {', '.join(undivided)}: each of the {tp} tensor-parallel "
                         f"ranks must hold an equal share of every head count and width")


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False, loss_parallel: bool = False,
             vocab_parallel: bool = True) -> dict[str, ParallelStyle]:
    """Shard `model` (a Transformer, possibly with LoRA adapters) in place over the 1-D `tp_mesh`; returns the
    plan applied (module name -> style).

    loss_parallel: the logits stay a DTensor sharded over the vocabulary; compute the cross-entropy and its
    backward inside `torch.distributed.tensor.parallel.loss_parallel()`. Otherwise every rank gets the whole
    logits. vocab_parallel=False keeps the embedding and the head whole on every rank (for a vocabulary that
    tp does not divide). With sequence_parallel, forward takes sequences whose length tp divides.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tp takes a 1-D tensor-parallel mesh, got one of shape {tuple(tp_mesh.shape)}")
    tp = tp_mesh.size()
    check_tp(model.config, tp, vocab_parallel)
    if loss_parallel and not vocab_parallel:
        raise ValueError("loss_parallel needs the head sharded over the vocabulary (vocab_parallel=True)")
    if loss_parallel and getattr(model, "lm_head", None) is None:
        raise ValueError("loss_parallel shards the logits of the lm_head, and this model has none")
    if sequence_parallel and not vocab_parallel:
        raise ValueError("sequence_parallel needs vocab_parallel=True: the sharded embedding splits the sequence "
                         "and the sharded head gathers it back")
    if sequence_parallel:
        check_sequence_parallel(model.config)
    plan = tp_plan(model, sequence_parallel, loss_parallel, vocab_parallel)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    tied = tied_vocab_modules(model)
    parallelize_module(model, tp_mesh, plan)
    # What the plan left whole (norms without sequence parallel, LoRA's rank-r factors, ...) is replicated.
    rest = {name: Replicated() for name in modules_with_plain_parameters(model)}
    parallelize_module(model, tp_mesh, rest)
    for head, embedding in tied:
        # Both weights have the same placement (the vocabulary dim 0 sharded, or replicated), so the head can
        # take the embedding's DTensor as its own.
        model.get_submodule(head).weight = model.get_submodule(embedding).weight
    # The styles wrap parameters anew, and SequenceParallel makes each one trainable: keep LoRA's freezing.
    for name, p in model.named_parameters():
        p.requires_grad_(requires_grad[name])
    if sequence_parallel:
        model.register_forward_pre_hook(sequence_length_check(tp), with_kwargs=True)
    return {**plan, **rest}


def tp_plan(model: nn.Module, sequence_parallel: bool = False, loss_parallel: bool = False,
            vocab_parallel: bool = True) -> dict[str, ParallelStyle]:
    """The parallelize_module plan of `model`, from the roles of its modules (danlu.models.roles)."""
    residual = Shard(1) if sequence_parallel else Replicate()  # the residual stream's layout between sublayers
    plan: dict[str, ParallelStyle] = {}
    for name in modules_with_role(model, COLUMN, ROW):
        plan.update(linear_plan(name, model.get_submodule(name), role_of(name), residual))
    if vocab_parallel:
        plan.update(vocab_plan(model, residual, loss_parallel))
    sublayers = sublayer_names(model)
    for name in norm_names(model):
        if name.rpartition(".")[0] in sublayers:
            # Qwen3's q/k norms inside attention see only this rank's heads [batch, heads, seq, head_dim]:
            # marking dim 1 sharded makes their weight gradient a sum over every rank's heads.
            plan[name] = SequenceParallel(sequence_dim=1, use_local_output=True)
        elif sequence_parallel:
            plan[name] = SequenceParallel(use_local_output=True)
    if sequence_parallel:
        for name in sublayers:
            arity = positional_arity(model.get_submodule(name))
            plan[name] = PrepareModuleInput(input_layouts=(Shard(1),) + (None,) * (arity - 1),
                                            desired_input_layouts=(Replicate(),) + (None,) * (arity - 1),
                                            use_local_output=True)
    return plan


def linear_plan(name: str, module: nn.Module, role: str, residual: Placement) -> dict[str, ParallelStyle]:
    """A column or row linear, or a LoRA adapter around one: the base layer is split as the plain linear would
    be, and of the adapter only the factor that touches the split dimension (lora_B of a column linear,
    lora_A of a row linear) is split with it; the rank-r factor in between stays whole on every rank."""
    if isinstance(module, LoRALinear) and type(module.base_layer) is nn.Linear:
        base = f"{name}.base_layer"
        if role == COLUMN:
            return {base: ColwiseParallel(), f"{name}.lora_B": ColwiseParallel()}
        plan = {base: RowwiseParallel(output_layouts=residual),
                f"{name}.lora_A": RowwiseParallel(output_layouts=residual)}
        if residual == Shard(1):
            # lora_B then sees only this rank's tokens: its gradient must be summed over the ranks.
            plan[f"{name}.lora_B"] = SequenceParallel(use_local_output=True)
        return plan
    if type(module) is not nn.Linear:
        inner = module.base_layer if isinstance(module, LoRALinear) else module
        raise ValueError(f"{name} is a {type(module).__name__} around a {type(inner).__name__}; tensor parallelism "
                         f"shards an nn.Linear or a LoRALinear around one (quantized base weights are not "
                         f"sharded yet)")
    if role == COLUMN:
        return {name: ColwiseParallel()}
    return {name: RowwiseParallel(output_layouts=residual)}


def vocab_plan(model: nn.Module, residual: Placement, loss_parallel: bool) -> dict[str, ParallelStyle]:
    """The embedding looks up the ids on its share of the vocabulary (the others' rows count as zero) and the
    partial embeddings are summed; the head computes the logits of its share of the vocabulary."""
    plan: dict[str, ParallelStyle] = {}
    for name in modules_with_role(model, VOCAB):
        module = model.get_submodule(name)
        if type(module) is nn.Embedding:
            plan[name] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
        elif type(module) is nn.Linear:
            plan[name] = ColwiseParallel(input_layouts=residual,
                                         output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                         use_local_output=not loss_parallel)
        else:
            raise ValueError(f"{name} is a {type(module).__name__}; vocabulary parallelism shards an nn.Embedding "
                             f"or a plain nn.Linear head (pass vocab_parallel=False to keep it whole)")
    return plan


class Replicated(ParallelStyle):
    """Parameters replicated as DTensors, plain tensors in and out: every rank computes the module whole, as
    without parallelism. Its inputs and output gradients are the same on every rank, so its parameter
    gradients are too, with no communication."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, input_fn=_replicated_inputs, output_fn=_local_outputs)


def _replicated_inputs(module: nn.Module, inputs: tuple, device_mesh: DeviceMesh) -> tuple:
    return tuple(DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
                 if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)


def _local_outputs(module: nn.Module, outputs, device_mesh: DeviceMesh):
    return outputs.to_local() if isinstance(outputs, DTensor) else outputs


def modules_with_plain_parameters(model: nn.Module) -> list[str]:
    """Modules holding a parameter of their own that is not a DTensor yet."""
    names = [name for name, module in model.named_modules()
             if any(not isinstance(p, DTensor) for p in module.parameters(recurse=False))]
    if "" in names:
        raise ValueError(f"{type(model).__name__} holds parameters of its own, outside any submodule; "
                         f"tensor parallelism distributes submodules")
    return names


def tied_vocab_modules(model: nn.Module) -> list[tuple[str, str]]:
    """(head, embedding) pairs of vocab modules sharing one weight (tie_word_embeddings)."""
    names = modules_with_role(model, VOCAB)
    embeddings = {id(model.get_submodule(n).weight): n for n in names if isinstance(model.get_submodule(n), nn.Embedding)}
    return [(n, embeddings[id(model.get_submodule(n).weight)]) for n in names
            if isinstance(model.get_submodule(n), nn.Linear) and id(model.get_submodule(n).weight) in embeddings]


def sublayer_names(model: nn.Module) -> list[str]:
    """The modules holding the column linears (attention, MLP): where a sublayer's input enters."""
    parents = (name.rpartition(".")[0] for name in modules_with_role(model, COLUMN))
    return list(dict.fromkeys(parents))


def norm_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, NORMS)]


def positional_arity(module: nn.Module) -> int:
    """How many positional inputs the module's forward takes; its caller passes them all (Block does)."""
    return len(inspect.signature(module.forward).parameters)


def check_sequence_parallel(config: ModelConfig) -> None:
    added = [name for name, present in (("position embeddings", config.position_embedding_type == "absolute"),
                                        ("token type embeddings", bool(config.type_vocab_size)),
                                        ("an embedding norm", config.embedding_norm)) if present]
    if added:
        raise ValueError(f"sequence_parallel splits the token embeddings along the sequence, and "
                         f"{config.name or 'this model'} adds {' and '.join(added)} to them whole; "
                         f"use sequence_parallel=False")


def sequence_length_check(tp: int):
    """A forward pre-hook refusing sequences that tp ranks cannot split evenly."""
    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids: Optional[torch.Tensor] = args[0] if args else kwargs.get("input_ids")
        if input_ids is not None and input_ids.shape[1] % tp:
            raise ValueError(f"sequence_parallel over tp={tp} ranks needs a sequence length divisible by {tp}, "
                             f"got {input_ids.shape[1]}; pad the batch to a multiple of {tp}")
    return check
