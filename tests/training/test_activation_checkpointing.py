"""Activation checkpointing, full and selective (--activation_checkpointing none|full|selective).

The tiny model in float32 on the CPU: recomputing runs the same kernels on the same inputs, so the gradients
and losses with checkpointing are not just close to those without, they are equal (tolerance 0, measured).
What each mode keeps is measured as the bytes of the tensors made in the forward pass that are still alive
when the backward pass starts (parameters and inputs excluded), and what it recomputes by the ops the backward
pass runs.
"""
import json
from collections import Counter
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from danlu.distributed.data_parallel import apply_ddp, apply_fsdp
from danlu.distributed.layout import ParallelLayout
from danlu.distributed.mesh import build_mesh
from danlu.distributed.tensor_parallel import apply_tp
from danlu.models.presets import get_preset
from danlu.models.transformer import Transformer
from danlu.training.activation_checkpointing import ATTENTION_OPS, MODES, apply_activation_checkpointing
from danlu.training.arguments import ArgumentError, TrainArguments
from danlu.tuning.lora import LoRAConfig, apply_lora
from tests.distributed import conftest as distributed_fixtures
from tests.distributed.test_data_parallel import assert_same_curve, logged_losses, settings, single_process, torchrun

BATCH, SEQ = 2, 32
CONFIG = get_preset("tiny-llama")
model_dir = distributed_fixtures.model_dir  # the fixture: a tiny random Llama with a byte tokenizer


class Recorder(TorchDispatchMode):
    """Counts the ops run and remembers the storage of every tensor they make (but those of `exclude`)."""

    def __init__(self, exclude=()):
        super().__init__()
        self.ops = Counter()
        self.excluded = {StorageWeakRef(t.untyped_storage()).cdata for t in exclude}
        self.made: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[func.overloadpacket] += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.excluded and (ref.cdata not in self.made or self.made[ref.cdata][0].expired()):
                    self.made[ref.cdata] = (ref, storage.nbytes())
        return out

    def live_bytes(self) -> int:
        return sum(size for ref, size in self.made.values() if not ref.expired())


def tiny_model(mode: str, lora: bool = False):
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    if lora:
        apply_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.1))  # dropout: the recomputation's RNG
        for name, p in model.named_parameters():  # nonzero B, so that the A factors get a gradient too
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    apply_activation_checkpointing(model, mode)
    return model


def batch(padded: bool):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ), generator=generator)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if padded:
        mask[1, :5] = 0  # left padding: the attention takes an explicit mask
    return ids, mask


def loss_of(model, ids, mask):
    logits = model(ids, attention_mask=mask)
    return F.cross_entropy(logits[:, :-1].reshape(-1, CONFIG.vocab_size), ids[:, 1:].reshape(-1))


def forward_backward(mode: str, padded: bool = False, lora: bool = False, model=None):
    """(bytes kept from forward to backward, ops of the forward, ops of the backward, gradients by name)."""
    model = model if model is not None else tiny_model(mode, lora)
    ids, mask = batch(padded)
    with Recorder(exclude=[*model.parameters(), *model.buffers(), ids, mask]) as forward:
        loss = loss_of(model, ids, mask)
        kept = forward.live_bytes()
    with Recorder() as backward:
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return kept, forward.ops, backward.ops, grads


# ---------------------------------------------------------------- the same gradients


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padding-mask"])
@pytest.mark.parametrize("lora", [False, True], ids=["full-weights", "lora"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_gradients_equal_those_without_checkpointing(mode, lora, padded):
    *_, reference = forward_backward("none", padded, lora)
    *_, grads = forward_backward(mode, padded, lora)
    assert grads.keys() == reference.keys() and len(grads) > 0
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- what each mode keeps and recomputes


def linear_output_bytes() -> int:
    """The outputs of one block's linears (q, k, v, o, gate, up, down) for the batch, in float32."""
    width = (CONFIG.num_attention_heads + 2 * CONFIG.num_key_value_heads) * CONFIG.head_dim \
        + 2 * CONFIG.hidden_size + 2 * CONFIG.intermediate_size
    return BATCH * SEQ * width * 4


@pytest.mark.parametrize("backend", ["default", "math"])
def test_selective_keeps_the_linear_outputs_only_more_than_full_less_than_none(backend):
    """On SDPA's fused path (flash on the CPU) and on its math path, whose QK^T and softmax(...)V are bmm:
    selective keeps exactly the linears' outputs on top of what full keeps (the blocks' inputs)."""
    with sdpa_kernel(SDPBackend.MATH) if backend == "math" else nullcontext():
        kept = {mode: forward_backward(mode, padded=True)[0] for mode in MODES}
    print(kept)
    assert kept["none"] > kept["selective"] > kept["full"]
    assert kept["selective"] - kept["full"] == CONFIG.num_hidden_layers * linear_output_bytes()


def test_selective_recomputes_the_attention_core_and_no_linear():
    _, forward, plain, _ = forward_backward("none")
    _, _, selective, _ = forward_backward("selective")
    _, _, full, _ = forward_backward("full")
    attention = [op for op in forward if "scaled_dot_product" in op.__name__]
    assert attention and set(attention) <= ATTENTION_OPS  # the policy names the op SDPA runs here
    layers = CONFIG.num_hidden_layers
    aten = torch.ops.aten
    for op in attention:
        assert forward[op] == layers and plain[op] == 0 and selective[op] == layers and full[op] == layers
    # The backward pass's matrix multiplications: selective's are the gradients' own, full recomputes the forward's
    assert selective[aten.mm] == plain[aten.mm] < full[aten.mm]
    assert selective[aten._softmax] + selective[aten.mul] > plain[aten._softmax] + plain[aten.mul]


# ---------------------------------------------------------------- with the parallel layouts


@pytest.fixture
def one_rank_mesh():
    """A process group of one gloo rank and its pp x dp x fsdp x tp mesh, each dimension 1."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield build_mesh(ParallelLayout(), torch.device("cpu"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["tp", "fsdp", "tp,fsdp", "ddp"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_the_checkpointed_blocks_survive_the_parallel_layouts(one_rank_mesh, mode, layout):
    """Checkpointing applied before the layout (as train does), then TP (DTensor), FSDP2 or DDP on one rank:
    the blocks still recompute, and the gradients are those of the plain model (equal under FSDP2 and DDP;
    under TP, whose DTensor ops take other kernels, within 5e-9 measured, 1e-7 allowed)."""
    *_, reference = forward_backward("none")
    model = tiny_model(mode)
    if "tp" in layout:
        apply_tp(model, one_rank_mesh["tp"])
    if "fsdp" in layout:
        apply_fsdp(model, one_rank_mesh["fsdp"])
    if layout == "ddp":
        apply_ddp(model, one_rank_mesh["dp"])
    _, _, backward, grads = forward_backward(mode, model=model)
    recomputed = sum(backward[op] for op in ATTENTION_OPS)
    assert recomputed >= CONFIG.num_hidden_layers
    assert grads.keys() == reference.keys()
    for name in reference:
        grad = grads[name].full_tensor() if hasattr(grads[name], "full_tensor") else grads[name]
        torch.testing.assert_close(grad, reference[name], rtol=0, atol=1e-7, msg=name)


# ---------------------------------------------------------------- arguments


def test_a_bad_value_is_refused_naming_the_field_and_the_choices():
    with pytest.raises(ArgumentError, match=r"activation_checkpointing must be one of none, full, selective; "
                                            r"got 'sel'"):
        TrainArguments(dataset="d", activation_checkpointing="sel")


def test_gradient_checkpointing_means_full_and_a_disagreement_names_both():
    assert TrainArguments(dataset="d").activation_checkpointing == "none"
    assert TrainArguments(dataset="d", gradient_checkpointing=True).activation_checkpointing == "full"
    assert TrainArguments(dataset="d", gradient_checkpointing=True,
                          activation_checkpointing="full").activation_checkpointing == "full"
    for mode in ("selective", "none"):
        with pytest.raises(ArgumentError, match=f"gradient_checkpointing True .* activation_checkpointing is {mode}"):
            TrainArguments(dataset="d", gradient_checkpointing=True, activation_checkpointing=mode)


# ---------------------------------------------------------------- whole runs


def test_danlu_train_with_selective_checkpointing_gives_the_curve_without(model_dir, tmp_path, tmp_path_factory):
    from danlu.cli.main import main

    single = single_process(model_dir, tmp_path_factory)  # no checkpointing
    out = tmp_path / "selective"
    flags = [part for key, value in settings(model_dir, out, activation_checkpointing="selective").items()
             for part in (f"--{key}", str(value))]
    assert main(["train", *flags]) == 0
    assert json.loads((out / "train_args.json").read_text())["activation_checkpointing"] == "selective"
    assert logged_losses(out) == logged_losses(single)  # equal, not close


def test_fsdp2_with_selective_checkpointing_equals_one_process(model_dir, tmp_path, tmp_path_factory):
    single = single_process(model_dir, tmp_path_factory)  # no checkpointing, the whole global batch
    out = tmp_path / "run"
    torchrun(settings(model_dir, out, per_device_train_batch_size=2, parallel="fsdp=2",
                      activation_checkpointing="selective"))
    assert_same_curve(logged_losses(out), logged_losses(single))
