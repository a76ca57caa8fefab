"""The one model runs as a tensor-parallel shard and as pipeline stages without knowing it."""
import copy

import pytest
import torch
from torch import nn

from danlu.generation.kv_cache import KVCache
from danlu.models.presets import get_preset
from danlu.models.roles import COLUMN, ROW, role_of
from danlu.models.rope import rope_cos_sin
from danlu.models.transformer import Block, Transformer, pipeline_stage


def random_model(config) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():  # norm weights away from one, so that a mis-sliced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


# ------------------------------------------------------------------ tensor parallel

def shard(module: nn.Module, rank: int, world: int) -> nn.Module:
    """One rank's copy of an attention or MLP module: column linears keep a slice of their output rows,
    row linears the matching slice of their input columns (their bias is added once, by rank 0)."""
    piece = copy.deepcopy(module)
    for name, linear in piece.named_modules():
        role = role_of(name)
        if role == COLUMN:
            linear.weight = nn.Parameter(linear.weight.chunk(world, dim=0)[rank])
            if linear.bias is not None:
                linear.bias = nn.Parameter(linear.bias.chunk(world)[rank])
        elif role == ROW:
            linear.weight = nn.Parameter(linear.weight.chunk(world, dim=1)[rank])
            if linear.bias is not None and rank:
                linear.bias = None
    return piece


@pytest.mark.parametrize("preset,overrides", [
    ("tiny-qwen3", {}),
    ("tiny-qwen2", {}),
    ("tiny-llama", {"qkv_bias": True, "o_bias": True, "mlp_bias": True}),
])
def test_tensor_parallel_shards_sum_to_the_unsharded_output(preset, overrides):
    config = get_preset(preset).replace(**overrides)
    model = random_model(config)
    block = model.model.layers[0]
    x = torch.randn(2, 7, config.hidden_size, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_cos_sin(model.rope_inverse_frequencies(x.device), torch.arange(7)[None], x.dtype)
    cases = [(block.self_attn, lambda m: m(x, cos, sin, None)), (block.mlp, lambda m: m(x))]
    with torch.no_grad():
        for module, run in cases:
            shards = [shard(module, rank, 2) for rank in range(2)]
            partial = sum(run(s) for s in shards)
            assert (partial - run(module)).abs().max().item() <= 1e-5
    attention = shard(block.self_attn, 0, 2)
    assert attention.q_proj.weight.shape[0] == config.num_attention_heads // 2 * config.head_dim
    assert attention.k_proj.weight.shape[0] == config.num_key_value_heads // 2 * config.head_dim


# ------------------------------------------------------------------ pipeline parallel

@pytest.fixture
def whole_and_stages():
    config = get_preset("tiny-qwen3").replace(num_hidden_layers=3)
    whole = random_model(config)
    stages = [pipeline_stage(config, range(0, 1)).eval(), pipeline_stage(config, range(1, 3)).eval()]
    for stage in stages:
        stage.load_state_dict({k: v for k, v in whole.state_dict().items() if k in stage.state_dict()})
    return whole, stages


def test_stages_hold_their_part_under_the_whole_models_names(whole_and_stages):
    whole, (first, second) = whole_and_stages
    first_names, second_names = set(first.state_dict()), set(second.state_dict())
    assert not first_names & second_names and first_names | second_names == set(whole.state_dict())
    assert first.lm_head is None and first.model.norm is None and second.model.embed_tokens is None
    assert [block.layer_idx for block in second.model.layers] == [1, 2] and len(second.model.layers) == 2
    assert all(isinstance(block, Block) for block in whole.model.layers)
    assert whole.model.layers[2] is whole.get_submodule("model.layers.2")


def test_two_stages_chained_equal_the_whole_model(whole_and_stages):
    whole, (first, second) = whole_and_stages
    ids = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        hidden = first(ids, attention_mask=mask)
        chained = second(hidden, attention_mask=mask)
        expected = whole(ids, attention_mask=mask)
    assert hidden.shape == (2, 11, whole.config.hidden_size)
    assert (chained - expected).abs().max().item() <= 1e-5


def test_stages_decode_with_their_own_kv_caches(whole_and_stages):
    whole, stages = whole_and_stages
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    caches = [KVCache(whole.config, 1, 16, torch.float32, "cpu") for _ in stages]

    def step(chunk):
        for stage, cache in zip(stages, caches):
            chunk = stage(chunk, kv_cache=cache)
        return chunk

    with torch.no_grad():
        decoded = torch.cat([step(ids[:, :5])] + [step(ids[:, t:t + 1]) for t in range(5, 9)], dim=1)
        expected = whole(ids)
    assert (decoded - expected).abs().max().item() <= 1e-4


def test_a_stage_needs_a_range_of_existing_layers():
    config = get_preset("tiny-llama")
    with pytest.raises(ValueError, match="range of consecutive layer indices"):
        Transformer(config, layers=range(1, 3))
    with pytest.raises(ValueError, match="range of consecutive layer indices"):
        Transformer(config, layers=range(0, 2, 2))
