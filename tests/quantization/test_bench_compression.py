"""bench/bench_compression.py's helpers on tiny modules (the benchmark itself needs the real model: run it by hand)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bc():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_compression
        yield bench_compression
    finally:
        sys.path.remove(str(BENCH))


def test_agreement_counts_positions_and_the_first_difference(bc):
    assert bc.agreement([1, 2, 3, 4], [1, 2, 3, 4], k=3) == {"equal": 3, "of": 3, "first_difference": None}
    assert bc.agreement([1, 9, 3, 4], [1, 2, 3, 4]) == {"equal": 3, "of": 4, "first_difference": 1}


def test_rows_always_include_both_references_in_table_order(bc):
    names = [m.name for m in bc.select_methods("danlu int4 g64, danlu int8", llamacpp=False)]
    assert names == ["transformers float32", "danlu float32", "danlu int8", "danlu int4 g64"]
    assert "llama.cpp" not in [m.name for m in bc.select_methods(None, llamacpp=False)]
    assert "llama.cpp" in [m.name for m in bc.select_methods(None, llamacpp=True)]
    with pytest.raises(SystemExit, match="unknown row"):
        bc.select_methods("danlu int3", llamacpp=False)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_sizes_count_a_tied_head_once_and_quantized_layers_by_storage(bc):
    from danlu.quantization.linear import WeightOnlyLinear

    model = Tied()
    assert bc.float_file_bytes(model, torch.float32) == (40 + 16) * 4
    assert bc.float_file_bytes(model, torch.bfloat16) == (40 + 16) * 2
    assert bc.model_bytes(model) == (40 + 16) * 4
    assert bc.linear_bytes(model) == (16 + 40) * 4  # the head is a linear layer, its weight the embedding
    model.proj = WeightOnlyLinear.from_linear(model.proj, 8)
    assert bc.held_values(model) == 40 + 16
    assert bc.linear_bytes(model) == model.proj.storage_bytes() + 40 * 4
    assert bc.kernel_bytes(model) == 0  # no forward yet: no kernel layout


def test_targets_judge_each_quantized_row(bc):
    methods = bc.select_methods("danlu int8", llamacpp=False)
    speed = lambda tps: {"tokens_per_s": tps}  # noqa: E731
    results = {"decode_b1": {"transformers float32": speed(10.0), "danlu float32": speed(11.0),
                             "danlu int8": speed(25.0)},
               "decode_b8": {"transformers float32": speed(40.0), "danlu float32": speed(40.0),
                             "danlu int8": speed(60.0)},
               "perplexity": {"danlu float32": {"perplexity": 20.0}, "danlu int8": {"perplexity": 20.3}}}
    checks = {target: result for target, row, _, result in bc.target_checks(methods, results)}
    assert checks == {"int8 decode b1 >= 2x transformers": "PASS", "int8 decode b8 >= 2x transformers": "MISS",
                      "int8 ppl within 1% of float32": "MISS"}
