"""Automatic prefix caching: a prompt that begins as an earlier one did copies that beginning's keys and values and
prefills only the rest, with the logits (and the decoding after them) of a full prefill; blocks are matched by
everything before them and by the adapter; the cache evicts a chain's tail before its head."""
import pytest
import torch
from fastapi.testclient import TestClient

from danlu.cli.main import build_parser
from danlu.models.presets import get_preset
from danlu.models.transformer import Transformer
from danlu.serving.api import create_app
from danlu.serving.engine import Engine, prefix_cache_for
from danlu.serving.prefix_cache import PrefixCache
from danlu.serving.runner import ModelRunner
from tests.serving.test_api_unit import CharTokenizer


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Transformer(get_preset("tiny-llama")).eval()


def prompt(start: int, length: int) -> list[int]:
    return [(start + 7 * i) % 250 + 3 for i in range(length)]


SHARED = prompt(0, 37)  # 2 whole blocks of 16 and 5 tokens


def test_a_prompt_starting_like_an_earlier_one_prefills_only_its_new_tokens_with_the_same_logits(model):
    first, second = SHARED + [9, 8], SHARED + prompt(100, 20)
    cache = PrefixCache(block_size=16, max_blocks=64)
    runner, plain = ModelRunner(model, 2, prefix_cache=cache), ModelRunner(model, 2)
    runner.prefill([0], [first])
    assert (cache.queried_tokens, cache.hit_tokens, len(cache.blocks)) == (39, 0, 2)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    cached = runner.prefill([1], [second])
    assert calls == [torch.Size([1, len(second) - 32])]  # the two shared blocks were not computed again
    assert cache.hit_tokens == 32 and len(cache.blocks) == 3  # and the second prompt's own third block is kept
    assert torch.allclose(cached, plain.prefill([1], [second]), atol=1e-5)
    steps = [runner.decode([1], [t]) for t in (4, 5, 6)]
    assert torch.allclose(torch.cat(steps), torch.cat([plain.decode([1], [t]) for t in (4, 5, 6)]), atol=1e-5)


def test_a_finished_answer_is_kept_so_the_next_turn_finds_the_conversation_so_far(model):
    cache = PrefixCache(block_size=8, max_blocks=64)
    runner, plain = ModelRunner(model, 1, prefix_cache=cache), ModelRunner(model, 1)
    question = prompt(0, 13)
    answer = [int(runner.prefill([0], [question])[0].argmax())]
    for _ in range(11):
        answer.append(int(runner.decode([0], [answer[-1]])[0].argmax()))
    runner.remember(0, question + answer, None)  # the slot holds 13 + 11 tokens' keys: 3 blocks of 8
    assert cache.hit_tokens == 0 and len(cache.blocks) == 3
    next_turn = question + answer + prompt(60, 6)
    assert torch.allclose(runner.prefill([0], [next_turn]), plain.prefill([0], [next_turn]), atol=1e-5)
    assert cache.hit_tokens == 24


def test_rows_with_different_cached_beginnings_prefill_together_and_in_chunks(model):
    cache = PrefixCache(block_size=4, max_blocks=64)
    runner = ModelRunner(model, 3, chunk=5, prefix_cache=cache)
    runner.prefill([0], [prompt(0, 13)])  # 3 blocks cached
    prompts = [prompt(0, 9) + [200, 201], prompt(0, 30), prompt(50, 7)]  # hits of 8, 12 and 0 tokens
    together = runner.prefill([0, 1, 2], prompts)
    assert cache.hit_tokens == 20
    alone = torch.stack([ModelRunner(model, 1).prefill([0], [p])[0] for p in prompts])
    assert torch.allclose(together, alone, atol=1e-5)
    full = [model(torch.tensor([p + [3]]))[0, -1] for p in prompts]
    assert torch.allclose(runner.decode([0, 1, 2], [3, 3, 3]), torch.stack(full), atol=1e-5)


def test_blocks_match_only_after_the_same_beginning_under_the_same_adapter():
    cache = PrefixCache(block_size=4)
    tokens = prompt(0, 13)
    assert len(cache.digests(tokens, None)) == 3 and len(cache.digests(tokens[:12], None)) == 2  # never the last
    other_start = [99] + tokens[1:]
    assert not set(cache.digests(tokens, None)) & set(cache.digests(other_start, None))  # later blocks differ too
    assert not set(cache.digests(tokens, None)) & set(cache.digests(tokens, "zh"))


def test_the_least_recently_used_chain_loses_its_tail_first_and_a_cached_block_always_has_its_parents(model):
    cache = PrefixCache(block_size=4, max_blocks=5)
    runner = ModelRunner(model, 1, prefix_cache=cache)
    old, new = prompt(0, 17), prompt(100, 13)  # 4 blocks, then 3
    runner.prefill([0], [old])
    runner.prefill([0], [new])
    assert set(cache.blocks) == set(cache.digests(old, None)[:2]) | set(cache.digests(new, None))
    runner.prefill([0], [old])  # its head is found again; only its first two blocks were left
    assert cache.hit_tokens == 8


def test_the_engine_answers_the_same_with_and_without_prefix_caching_and_counts_its_hits(model):
    system = "You are a helpful assistant who answers briefly. "

    def answers(engine):
        client = TestClient(create_app(engine.start(), "tiny"))
        try:
            return [client.post("/v1/chat/completions", json={
                "model": "tiny", "max_tokens": 6, "temperature": 0,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
            ).json()["choices"][0]["message"]["content"] for question in ("hi", "why?", "how so")], client
        finally:
            engine.stop()

    cached, client = answers(Engine(model, CharTokenizer(), max_batch=2, eos_ids=[]))
    assert cached == answers(Engine(model, CharTokenizer(), max_batch=2, eos_ids=[], prefix_cache_mib=0))[0]
    metrics = client.get("/metrics").text
    hits = int(next(line.split()[-1] for line in metrics.splitlines()
                    if line.startswith("danlu:prefix_cache_hits_total")))
    assert hits >= 2 * 48  # the later two questions found the system prompt's three blocks
    queries = int(next(line.split()[-1] for line in metrics.splitlines()
                       if line.startswith("danlu:prefix_cache_queries_total")))
    assert queries == sum(len(system) + 1 + len(question) + 1 for question in ("hi", "why?", "how so"))


def test_the_cache_size_comes_from_mib_and_zero_turns_it_off(model):
    config = model.config
    block_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 16 * 4
    assert prefix_cache_for(model, 1).max_blocks == 2**20 // block_bytes
    assert prefix_cache_for(model, 0) is None
    with pytest.raises(ValueError, match="prefix cache size"):
        prefix_cache_for(model, -1)
    args = build_parser().parse_args(["api", "--model", "m", "--no-enable-prefix-caching"])
    assert args.prefix_caching is False
    assert build_parser().parse_args(["api", "--model", "m", "--prefix-cache-mib", "64"]).prefix_cache_mib == 64
