"""danlu.pruning and `danlu prune`: magnitude zeros, structured pruning equal to masking, HF round trips."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from danlu.checkpoints.hf import save_hf_checkpoint
from danlu.checkpoints.load import load_pretrained
from danlu.cli.main import main
from danlu.models.transformer import count_parameters
from danlu.pruning.calibration import calibration_batches, read_calibration_texts
from danlu.pruning.magnitude import prune_magnitude
from danlu.pruning.structured import (ATTENTION, MLP, activation_scores, kept_unit_count, prune_heads,
                                      prune_neurons)
from tests.conftest import make_hf_model, save_hf_model

FAMILIES = ("llama", "qwen2")  # 4 query heads sharing 2 key/value heads, hidden 64, 128 neurons, 2 layers


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_dir(request, tmp_path_factory):
    return save_hf_model(make_hf_model(request.param), tmp_path_factory.mktemp(request.param))


def tiny(directory):
    return load_pretrained(directory, dtype="float32", device="cpu").model


def calibration():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, 256, (2, 12), generator=generator) for _ in range(2)]


TOKENS = torch.tensor([[1, 17, 99, 5, 250, 42, 7, 64, 128, 3]])


def body_weights(model):
    return {name: module.weight for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name != "lm_head"}


# ---------------------------------------------------------------- magnitude

def test_magnitude_layer_scope_zeroes_the_smallest_of_each_layer(tiny_dir):
    model = tiny(tiny_dir)
    before = {name: w.detach().clone() for name, w in body_weights(model).items()}
    head, embedding = model.lm_head.weight.detach().clone(), model.model.embed_tokens.weight.detach().clone()
    reached = prune_magnitude(model, 0.5, "layer")
    assert reached == pytest.approx(0.5, abs=1e-3)
    for name, weight in body_weights(model).items():
        zeroed = weight == 0
        assert int(zeroed.sum()) == round(0.5 * weight.numel()), name
        assert before[name][zeroed].abs().max() <= before[name][~zeroed].abs().min(), name
        assert torch.equal(weight[~zeroed], before[name][~zeroed])
    assert torch.equal(model.lm_head.weight, head) and torch.equal(model.model.embed_tokens.weight, embedding)


def test_magnitude_global_scope_uses_one_threshold(tiny_dir):
    model = tiny(tiny_dir)
    before = {name: w.detach().clone() for name, w in body_weights(model).items()}
    reached = prune_magnitude(model, 0.3, "global")
    assert reached == pytest.approx(0.3, abs=1e-4)
    zeroed_max = max(before[n][w == 0].abs().max() for n, w in body_weights(model).items() if (w == 0).any())
    kept_min = min(before[n][w != 0].abs().min() for n, w in body_weights(model).items())
    assert zeroed_max <= kept_min
    per_layer = [float((w == 0).float().mean()) for w in body_weights(model).values()]
    assert max(per_layer) - min(per_layer) > 0.01  # not the same fraction everywhere: the threshold is global


def test_magnitude_zero_sparsity_changes_nothing(tiny_dir):
    model = tiny(tiny_dir)
    before = copy.deepcopy(model.state_dict())
    assert prune_magnitude(model, 0.0) == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, True, "0.5"])
def test_bad_sparsity_is_refused(tiny_dir, sparsity):
    model = tiny(tiny_dir)
    for prune in (prune_magnitude, prune_heads, prune_neurons):
        with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
            prune(model, sparsity)


def test_unknown_scope_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="scope must be one of"):
        prune_magnitude(tiny(tiny_dir), 0.5, "row")


# ---------------------------------------------------------------- structured

def masked_reference(model, part, kept):
    """The unpruned model with the removed units' o_proj / down_proj columns zeroed: what pruning must equal."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for block, keep in zip(reference.model.layers, kept):
            linear = block.self_attn.o_proj if part == ATTENTION else block.mlp.down_proj
            units = reference.config.num_key_value_heads if part == ATTENTION else reference.config.intermediate_size
            width = linear.weight.shape[1] // units
            for unit in sorted(set(range(units)) - set(keep.tolist())):
                linear.weight[:, unit * width:(unit + 1) * width] = 0
    return reference


def removed_parameters(config, part, removed):
    layers, hidden = config.num_hidden_layers, config.hidden_size
    if part == MLP:
        return layers * removed * (3 * hidden + 2 * config.mlp_bias)
    group_rows = config.num_attention_heads // config.num_key_value_heads * config.head_dim
    qkv_rows = group_rows + 2 * config.head_dim
    return layers * removed * (qkv_rows * (hidden + config.qkv_bias) + group_rows * hidden)


@pytest.mark.parametrize("part, sparsity", [(ATTENTION, 0.5), (MLP, 0.25)])
@pytest.mark.parametrize("calibrated", [True, False])
def test_structured_pruning_equals_masking_and_loads_in_transformers(tiny_dir, tmp_path, part, sparsity,
                                                                      calibrated):
    from transformers import AutoModelForCausalLM

    model = tiny(tiny_dir)
    original, params_before = model.config, count_parameters(model)
    prune = prune_heads if part == ATTENTION else prune_neurons
    with torch.no_grad():
        pruned = prune(copy.deepcopy(model), sparsity, calibration() if calibrated else None)
    removed = pruned.total - pruned.kept.shape[1]
    assert removed == round(sparsity * pruned.total)
    reference = masked_reference(model, part, pruned.kept)
    small = copy.deepcopy(model)
    prune(small, sparsity, calibration() if calibrated else None)
    assert small.config == pruned.config
    with torch.no_grad():
        logits, expected = small(TOKENS), reference(TOKENS)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert not torch.allclose(logits, model(TOKENS), atol=1e-3)  # something was removed
    assert params_before - count_parameters(small) == removed_parameters(original, part, removed)
    if part == ATTENTION:
        assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 1)
    else:
        assert small.config.intermediate_size == 96
    assert small.config.head_dim == original.head_dim

    save_hf_checkpoint(small.state_dict(), small.config, tmp_path / "out", torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(hf(TOKENS).logits, logits, atol=1e-5)
        assert torch.allclose(tiny(tmp_path / "out")(TOKENS), logits, atol=1e-5)


def test_calibrated_and_weight_scores_choose_per_layer(tiny_dir):
    model = tiny(tiny_dir)
    pruned = prune_neurons(copy.deepcopy(model), 0.5, calibration())
    assert pruned.kept.shape == (2, 64)
    assert not torch.equal(pruned.kept[0], pruned.kept[1])  # each layer keeps its own neurons


def layer0_output(model, module_name, tokens):
    seen = []
    handle = model.get_submodule(f"model.layers.0.{module_name}").register_forward_hook(
        lambda m, args, out: seen.append(out))
    with torch.no_grad():
        for batch in tokens:
            model(batch)
    handle.remove()
    return torch.cat([s.flatten(0, 1) for s in seen])


@pytest.mark.parametrize("part, module_name", [(ATTENTION, "self_attn.o_proj"), (MLP, "mlp.down_proj")])
def test_activation_score_is_the_norm_of_what_removing_the_unit_changes(tiny_dir, part, module_name):
    model = tiny(tiny_dir)
    scores = activation_scores(model, calibration(), part)
    full = layer0_output(model, module_name, calibration())
    for unit in range(scores.shape[1])[:4]:
        keep = [u for u in range(scores.shape[1]) if u != unit]
        masked = masked_reference(model, part, [torch.tensor(keep)] * model.config.num_hidden_layers)
        change = (full - layer0_output(masked, module_name, calibration())).norm()
        assert scores[0, unit] == pytest.approx(float(change), rel=1e-4)


def test_removing_every_group_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="removes all 2 key/value groups"):
        prune_heads(tiny(tiny_dir), 0.75)
    with pytest.raises(ValueError, match="--sparsity 0.999 removes all 128 FFN neurons"):
        kept_unit_count(128, 0.999, MLP, "--sparsity")


# ---------------------------------------------------------------- calibration files

def test_calibration_files(tmp_path):
    (tmp_path / "a.txt").write_text("one text\n\nwith paragraphs", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "first"}) + "\n" + json.dumps({"text": "second"}) + "\n",
                                      encoding="utf-8")
    (tmp_path / "c.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n", encoding="utf-8")
    assert read_calibration_texts(tmp_path / "a.txt") == ["one text\n\nwith paragraphs"]
    assert read_calibration_texts(tmp_path / "b.jsonl") == ["first", "second"]
    with pytest.raises(ValueError, match="needs a string field 'text'"):
        read_calibration_texts(tmp_path / "c.jsonl")
    (tmp_path / "d.csv").write_text("text\nx\n", encoding="utf-8")
    with pytest.raises(ValueError, match="--calibration .*expected a .txt or .jsonl"):
        read_calibration_texts(tmp_path / "d.csv")
    with pytest.raises(ValueError, match="--calibration .*no such file"):
        read_calibration_texts(tmp_path / "missing.txt")


def test_calibration_batches_cut_rows():
    from tests.conftest import byte_tokenizer

    batches = calibration_batches(byte_tokenizer(), ["abcdefgh", "ijk"], seq_len=4, batch_size=2, max_tokens=11)
    assert [tuple(b.shape) for b in batches] == [(2, 4), (1, 3)]


# ---------------------------------------------------------------- the command

def test_cli_prunes_heads_and_writes_a_loadable_directory(tmp_path, capsys):
    from tests.conftest import byte_tokenizer

    source, tokenizer = tmp_path / "src", byte_tokenizer()
    save_hf_model(make_hf_model("llama", vocab_size=len(tokenizer)), source, tokenizer)
    (tmp_path / "cal.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    out = tmp_path / "out"
    assert main(["prune", str(source), "--method", "heads", "--sparsity", "0.25", "--output", str(out),
                 "--calibration", str(tmp_path / "cal.txt")]) == 0
    line = capsys.readouterr().out
    assert "removed 1 of 2 key/value groups per layer (50.0%; --sparsity 0.25)" in line and "scored on" in line
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 16)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert load_pretrained(out, dtype="float32", device="cpu").model.config.num_key_value_heads == 1
    assert main(["prune", str(source), "--method", "ffn", "--sparsity", "0.5", "--output", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["prune", str(source), "--method", "magnitude", "--sparsity", "0.5", "--output", str(out),
                 "--force"]) == 0
    assert "zeroed 50.0% of the linear weights (layer scope)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--method", "heads", "--sparsity", "1"], "--sparsity must be a number in [0, 1)"),
    (["--method", "heads", "--sparsity", "0.9"], "--sparsity 0.9 removes all 2 key/value groups"),
    (["--method", "magnitude", "--sparsity", "0.5", "--calibration", "x.txt"], "--calibration is for --method"),
    (["--method", "ffn", "--sparsity", "0.5", "--scope", "global"], "--scope is for --method magnitude"),
])
def test_cli_bad_input(tiny_dir, tmp_path, capsys, argv, message):
    assert main(["prune", str(tiny_dir), *argv, "--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_unknown_method(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", str(tiny_dir), "--method", "wanda", "--sparsity", "0.5", "--output", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "argument --method: invalid choice: 'wanda'" in capsys.readouterr().err


# ---------------------------------------------------------------- the real model

@pytest.mark.real
def test_real_model_ffn_pruning_loads_in_transformers(real_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = load_pretrained(real_gguf, dtype="float32", device="cpu")
    before = count_parameters(lm.model)
    texts = read_calibration_texts("data/danlu_text.jsonl")[:40]
    pruned = prune_neurons(lm.model, 0.25, calibration_batches(lm.tokenizer, texts, seq_len=128, max_tokens=512))
    assert pruned.config.intermediate_size == 1536 - 384
    after = count_parameters(lm.model)
    assert before - after == 30 * 384 * 3 * 576
    save_hf_checkpoint(lm.model.state_dict(), lm.model.config, tmp_path / "out", torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.tensor([lm.tokenizer("Japan is an archipelago of several thousand islands")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, lm.model(ids), atol=1e-4)
    assert sum(p.numel() for p in hf.parameters()) == after
