"""Tensor parallelism on real processes: 2 ranks on gloo, each matching the single-process model.

Every rank builds the same seeded model and keeps a copy of it as the single-process reference before
sharding its own. float32 throughout; TP changes only the order of summation, so the tolerances are a few
float32 rounding steps (eps = 1.2e-7): differences of logits and weights are relative to the reference's
largest magnitude (measured: up to 2.6e-7 for logits, 4.2e-7 for weights after a step), losses and gradient
norms relative (measured: 0 and ~1e-7).
"""
import copy
from contextlib import nullcontext
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, loss_parallel

from danlu.distributed.tensor_parallel import apply_tp, check_tp, tp_plan
from danlu.models.presets import get_preset
from danlu.models.roles import COLUMN, ROW, modules_with_role
from danlu.models.transformer import Transformer
from danlu.training.losses import causal_lm_loss
from danlu.tuning.lora import LoRAConfig, apply_lora

WORLD = 2
LOGITS_TOLERANCE = 2e-6
WEIGHTS_TOLERANCE = 2e-6  # after one SGD step with LEARNING_RATE
LOSS_TOLERANCE = 1e-6
LEARNING_RATE = 0.5

CASES = {  # name -> (preset, overrides)
    "llama-gqa": ("tiny-llama", {}),
    "llama-biases": ("tiny-llama", {"o_bias": True, "mlp_bias": True}),
    "qwen2-qkv-bias-tied": ("tiny-qwen2", {}),
    "qwen3-qk-norm-tied": ("tiny-qwen3", {}),
}


# ------------------------------------------------------------------ running on 2 processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_ranks(worker, *args):
    """Run worker(mesh, *args) on WORLD gloo processes; returns what rank 0's worker returned."""
    with tempfile.TemporaryDirectory() as directory:
        result = Path(directory) / "result.json"
        mp.spawn(_rank_main, args=(worker, free_port(), str(result), args), nprocs=WORLD)
        return json.loads(result.read_text())


def _rank_main(rank, worker, port, result, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # one core per rank
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
        answer = worker(mesh, *args)
        if rank == 0:
            Path(result).write_text(json.dumps(answer))
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: there, after destroy_process_group has returned, torch 2.13's
    # gloo now and then aborts the process ("terminate called without an active exception"; 1 spawn in 12).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------ models and data, the same on every rank

def seeded_model(case: str) -> Transformer:
    preset, overrides = CASES[case]
    torch.manual_seed(0)
    model = Transformer(get_preset(preset).replace(**overrides))
    with torch.no_grad():  # norm weights away from one, so that a norm left unsynchronised shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def batch(vocab_size: int, seq: int = 8):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab_size, (2, seq), generator=generator)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that is not trained on
    return ids, labels


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def max_difference(a: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest difference relative to the reference's largest magnitude (the logits of a tied head, whose
    weights are the embedding's N(0, 1), reach tens; a bias stays near 0.1)."""
    reference = full(reference)
    return ((full(a) - reference).abs().max() / reference.abs().max().clamp(min=1e-12)).item()


def sgd_step(model, ids, labels, parallel_loss: bool = False) -> tuple[float, float]:
    """One SGD step; the loss and the gradient norm (clip_grad_norm_ as the training loop calls it)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=LEARNING_RATE)
    with loss_parallel() if parallel_loss else nullcontext():
        loss, _ = causal_lm_loss(model(ids), labels)
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm=float("inf"))  # measures, scales by 1
    optimizer.step()
    return full(loss).item(), full(norm).item()


def weight_differences(model, reference) -> dict[str, float]:
    references = dict(reference.named_parameters())
    return {name: max_difference(p, references[name]) for name, p in model.named_parameters()}


# ------------------------------------------------------------------ workers (module level: spawn pickles them)

def logits_worker(mesh, cases, sequence_parallel):
    differences = {}
    for case in cases:
        reference = seeded_model(case).eval()
        model = copy.deepcopy(reference)
        apply_tp(model, mesh, sequence_parallel=sequence_parallel)
        ids, _ = batch(model.config.vocab_size)
        with torch.no_grad():
            logits = model(ids)
            differences[case] = max_difference(logits, reference(ids))
        assert type(logits) is torch.Tensor and logits.shape == (2, 8, model.config.vocab_size)
    return differences


def step_worker(mesh, cases, options):
    """One SGD step on the TP model and on the reference: the losses, gradient norms and every updated weight."""
    result = {}
    for case in cases:
        reference = seeded_model(case)
        model = copy.deepcopy(reference)
        apply_tp(model, mesh, **options)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        ids, labels = batch(model.config.vocab_size)
        (loss, norm), (reference_loss, reference_norm) = (
            sgd_step(model, ids, labels, options.get("loss_parallel", False)), sgd_step(reference, ids, labels))
        weights = weight_differences(model, reference)
        name, worst = max(weights.items(), key=lambda item: item[1])
        result[case] = {"loss": abs(loss / reference_loss - 1), "grad_norm": abs(norm / reference_norm - 1),
                        "weights": worst, "worst_weight": name,
                        "tied": model.lm_head.weight is model.model.embed_tokens.weight}
    return result


def loss_parallel_worker(mesh, case):
    """The cross-entropy of vocabulary-sharded logits under loss_parallel() against the plain one."""
    reference = seeded_model(case)
    model = copy.deepcopy(reference)
    apply_tp(model, mesh, loss_parallel=True)
    ids, labels = batch(model.config.vocab_size)
    with loss_parallel():
        logits = model(ids)
        assert isinstance(logits, DTensor) and logits.placements == (Shard(2),)
        assert logits.to_local().shape[-1] == model.config.vocab_size // WORLD
        loss, count = causal_lm_loss(logits, labels)
        loss.backward()
    reference_loss, reference_count = causal_lm_loss(reference(ids), labels)
    reference_loss.backward()
    head = model.lm_head.weight.grad
    return {"loss": abs(full(loss).item() / reference_loss.item() - 1), "count": [count, reference_count],
            "head_grad": max_difference(head, reference.lm_head.weight.grad)}


def lora_worker(mesh, case, sequence_parallel):
    """LoRA on every column and row linear: the adapters' forward and their step match, the base stays frozen."""
    reference = seeded_model(case)
    apply_lora(reference, LoRAConfig(rank=4, alpha=8.0, targets=["all"]))
    with torch.no_grad():  # lora_B starts at zero; give it values so the update shows in the logits
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model = copy.deepcopy(reference)
    apply_tp(model, mesh, sequence_parallel=sequence_parallel)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(name for name, p in reference.named_parameters() if p.requires_grad)
    ids, labels = batch(model.config.vocab_size)
    with torch.no_grad():
        logits = max_difference(model(ids), reference(ids))
    (loss, _), (reference_loss, _) = sgd_step(model, ids, labels), sgd_step(reference, ids, labels)
    weights = weight_differences(model, reference)
    return {"logits": logits, "loss": abs(loss / reference_loss - 1),
            "lora_weights": max(d for name, d in weights.items() if "lora_" in name),
            "base_weights": max(d for name, d in weights.items() if "lora_" not in name),
            "trainable": len(trainable)}


def refusal_worker(mesh):
    """What apply_tp refuses with the mesh in hand: sizes tp does not divide, and odd sequence lengths."""
    messages = {}
    model = Transformer(get_preset("tiny-mistral"))  # one key/value head
    try:
        apply_tp(model, mesh)
    except ValueError as e:
        messages["kv_heads"] = str(e)
    assert not any(isinstance(p, DTensor) for p in model.parameters()), "refused only after sharding"
    model = seeded_model("llama-gqa")
    try:
        apply_tp(model, mesh, sequence_parallel=True, vocab_parallel=False)
    except ValueError as e:
        messages["whole_vocabulary"] = str(e)
    apply_tp(model, mesh, sequence_parallel=True)
    try:
        model(torch.zeros(1, 7, dtype=torch.long))
    except ValueError as e:
        messages["sequence"] = str(e)
    return messages


# ------------------------------------------------------------------ the tests

@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_logits_equal_the_single_process_model(sequence_parallel):
    differences = run_on_ranks(logits_worker, list(CASES), sequence_parallel)
    print("max |logits - reference|:", differences)
    assert set(differences) == set(CASES)
    assert max(differences.values()) <= LOGITS_TOLERANCE, differences


@pytest.mark.parametrize("options", [{}, {"sequence_parallel": True},
                                     {"sequence_parallel": True, "loss_parallel": True}, {"vocab_parallel": False}],
                         ids=["tp", "tp+sp", "tp+sp+loss_parallel", "tp-whole-vocabulary"])
def test_one_sgd_step_updates_the_weights_as_one_process_does(options):
    result = run_on_ranks(step_worker, list(CASES), options)
    print("after one SGD step:", result)
    for case, measured in result.items():
        assert measured["loss"] <= LOSS_TOLERANCE, (case, measured)
        assert measured["grad_norm"] <= LOSS_TOLERANCE, (case, measured)
        assert measured["weights"] <= WEIGHTS_TOLERANCE, (case, measured)
    assert result["qwen2-qkv-bias-tied"]["tied"] and not result["llama-gqa"]["tied"]


def test_loss_parallel_cross_entropy_equals_the_plain_one():
    result = run_on_ranks(loss_parallel_worker, "llama-gqa")
    print("loss_parallel:", result)
    assert result["loss"] <= LOSS_TOLERANCE
    assert result["count"][0] == result["count"][1] == 2 * 7 - 2  # 7 targets a row; row 0's first 2 are prompt
    assert result["head_grad"] <= WEIGHTS_TOLERANCE


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_lora_adapters_shard_with_their_base_layers(sequence_parallel):
    result = run_on_ranks(lora_worker, "qwen2-qkv-bias-tied", sequence_parallel)
    print("LoRA:", result)
    assert result["trainable"] == 2 * 7 * 2  # lora_A and lora_B of 7 linears in 2 layers
    assert result["logits"] <= LOGITS_TOLERANCE
    assert result["loss"] <= LOSS_TOLERANCE
    assert result["lora_weights"] <= WEIGHTS_TOLERANCE
    assert result["base_weights"] == 0.0  # frozen: not one bit moved


def test_apply_tp_refuses_before_sharding_and_odd_sequences_under_sp():
    messages = run_on_ranks(refusal_worker)
    assert messages["kv_heads"].startswith("tp=2 does not divide num_key_value_heads=1")
    assert "sequence length divisible by 2, got 7" in messages["sequence"]
    assert messages["whole_vocabulary"].startswith("sequence_parallel needs vocab_parallel=True")


# ------------------------------------------------------------------ single process: the plan and the checks

def test_check_tp_names_the_sizes_that_tp_does_not_divide():
    config = get_preset("tiny-llama")  # 4 heads, 2 key/value heads, intermediate 128, vocabulary 256
    check_tp(config, 2)
    with pytest.raises(ValueError, match=r"^tp=4 does not divide num_key_value_heads=2:"):
        check_tp(config, 4)
    with pytest.raises(ValueError, match=r"tp=3 does not divide num_attention_heads=4, num_key_value_heads=2, "
                                         r"intermediate_size=128, vocab_size=256"):
        check_tp(config, 3)
    with pytest.raises(ValueError, match="tp=2 does not divide vocab_size=255"):
        check_tp(config.replace(vocab_size=255), 2)
    check_tp(config.replace(vocab_size=255), 2, vocab_parallel=False)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=f"tp must be a positive integer, got {bad!r}"):
            check_tp(config, bad)


def test_plan_follows_the_roles():
    model = Transformer(get_preset("tiny-qwen3"))
    plan = tp_plan(model)
    assert [n for n, s in plan.items() if type(s) is ColwiseParallel] == modules_with_role(model, COLUMN) + ["lm_head"]
    assert [n for n, s in plan.items() if type(s) is RowwiseParallel] == modules_with_role(model, ROW) + [
        "model.embed_tokens"]
    # q/k norms see only their rank's heads; the residual norms stay whole without sequence parallel.
    assert sorted(n for n, s in plan.items() if type(s) is SequenceParallel) == sorted(
        f"model.layers.{i}.self_attn.{norm}" for i in range(2) for norm in ("q_norm", "k_norm"))
    sequence_plan = tp_plan(model, sequence_parallel=True)
    assert {"model.norm", "model.layers.1.input_layernorm", "model.layers.0.self_attn",
            "model.layers.0.mlp"} <= set(sequence_plan)


def test_plan_shards_lora_adapters_with_their_base_layer():
    model = Transformer(get_preset("tiny-llama"))
    apply_lora(model, LoRAConfig(rank=4, targets=["q_proj", "o_proj"]))
    plan = tp_plan(model)
    q, o = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
    assert type(plan[f"{q}.base_layer"]) is ColwiseParallel and type(plan[f"{q}.lora_B"]) is ColwiseParallel
    assert type(plan[f"{o}.base_layer"]) is RowwiseParallel and type(plan[f"{o}.lora_A"]) is RowwiseParallel
    assert f"{q}.lora_A" not in plan and f"{o}.lora_B" not in plan  # the rank-r factor stays whole
    assert type(plan["model.layers.0.self_attn.k_proj"]) is ColwiseParallel


def test_sequence_parallel_is_refused_where_embeddings_are_added_whole():
    with pytest.raises(ValueError, match="adds position embeddings and token type embeddings and an embedding norm"):
        from danlu.distributed.tensor_parallel import check_sequence_parallel
        check_sequence_parallel(get_preset("tiny-bert"))
