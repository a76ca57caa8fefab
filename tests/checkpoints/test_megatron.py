"""Megatron-LM checkpoints: the split of each tensor, bit-exact round trips for every family, the files as Megatron
lays them out, direct loading for chat and training, and each bad input's error."""
import argparse
import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.load import load_config, load_pretrained
from danlu.checkpoints.megatron import MegatronSplit, from_megatron, load_shard, read_megatron, to_megatron
from danlu.cli.main import main
from tests.conftest import byte_tokenizer, make_hf_model, save_hf_model

FAMILIES = {  # each switch Megatron has to carry: GQA, qkv bias, tied head, q/k norms, sliding window, MQA
    "llama": {},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"head_dim": 32, "tie_word_embeddings": True},
    "mistral": {"sliding_window": 4},
    "llama-4-layers": {"num_hidden_layers": 4, "num_key_value_heads": 4},
}


def family_dir(tmp_path, family):
    hf = make_hf_model(family.split("-")[0], **FAMILIES[family])
    return save_hf_model(hf, tmp_path / family, byte_tokenizer())


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def safetensors_of(directory):
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def splits_for(config):
    """Every split the config allows: tp in {1, 2} where 2 divides its query groups, pp in {1, 2}, both layouts,
    and Transformer Engine's names."""
    for tp, pp, layout, te in itertools.product((1, 2), (1, 2), ("mcore", "legacy"), (False, True)):
        if (te and layout == "legacy") or (config.qk_norm and layout == "legacy") or config.num_key_value_heads % tp:
            continue
        yield MegatronSplit(tp=tp, pp=pp, layout=layout, te=te)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_through_every_split_is_bit_exact(tmp_path, family):
    lm = load_pretrained(family_dir(tmp_path, family), dtype="float32", device="cpu")
    state = lm.model.state_dict()
    if lm.config.tie_word_embeddings:
        del state["lm_head.weight"]
    splits = list(splits_for(lm.config))
    assert len(splits) >= 4
    for split in splits:
        back = from_megatron(to_megatron(state, lm.config, split), lm.config, split)
        assert back.keys() == state.keys(), split
        assert all(torch.equal(back[name], state[name]) for name in state), split


def test_qkv_is_packed_per_query_group_and_gate_up_per_rank():
    """The layouts seed 001 and Pai-Megatron-Patch's convertor give: [q_g; k_g; v_g] per group, tp ranks take
    whole groups; rank r's linear_fc1 is [gate_r; up_r] (not the first half of cat(gate, up))."""
    lm = load_pretrained("tiny-llama", dtype="float32", device="cpu")  # 4 heads, 2 groups, head_dim 16
    state = lm.model.state_dict()
    shards = to_megatron(state, lm.config, MegatronSplit(tp=2))
    layer = "model.layers.1."
    q, k, v = (state[f"{layer}self_attn.{n}_proj.weight"] for n in "qkv")
    rank1 = shards[1, 0]["decoder.layers.1.self_attention.linear_qkv.weight"]
    assert torch.equal(rank1, torch.cat([q[32:64], k[16:32], v[16:32]]))  # group 1: heads 2-3, its k and v
    gate, up = state[f"{layer}mlp.gate_proj.weight"], state[f"{layer}mlp.up_proj.weight"]
    fc1 = shards[1, 0]["decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([gate[64:], up[64:]]))
    down = shards[1, 0]["decoder.layers.1.mlp.linear_fc2.weight"]
    assert torch.equal(down, state[f"{layer}mlp.down_proj.weight"][:, 64:])
    embedding = state["model.embed_tokens.weight"]
    assert torch.equal(shards[1, 0]["embedding.word_embeddings.weight"], embedding[128:])
    padded = to_megatron(state, lm.config, MegatronSplit(tp=2, vocab_divisible_by=96))  # 256 rows -> 2 x 192
    rank1 = padded[1, 0]["embedding.word_embeddings.weight"]
    assert rank1.shape == (192, 64) and torch.equal(rank1[:64], embedding[192:]) and not rank1[64:].any()


# q/k norms (qwen3) exist in the mcore layout only (its refusal: test_qk_norms_in_the_legacy_layout_...).
@pytest.mark.parametrize("family,layout", [(f, layout) for f in ("llama", "qwen2", "qwen3", "mistral")
                                           for layout in ("mcore", "legacy") if (f, layout) != ("qwen3", "legacy")])
def test_convert_to_megatron_and_back_gives_the_same_files(capsys, tmp_path, family, layout):
    src = family_dir(tmp_path, family)
    tp = 1 if family == "mistral" else 2  # tiny-mistral is MQA: one query group cannot be split
    megatron, back = tmp_path / "megatron", tmp_path / "back"
    assert run(capsys, "convert", src, megatron, "--to", "megatron", "--tp", tp, "--pp", 2, "--layout", layout)[0] == 0
    assert run(capsys, "convert", megatron, back)[0] == 0
    original, returned = safetensors_of(src), safetensors_of(back)
    assert original.keys() == returned.keys()
    assert all(torch.equal(original[name], returned[name]) for name in original)
    assert json.loads((back / "config.json").read_text())["architectures"] == \
        json.loads((src / "config.json").read_text())["architectures"]


def test_the_files_are_megatrons(capsys, tmp_path):
    src = family_dir(tmp_path, "llama-4-layers")
    out = tmp_path / "m"
    code, _, _ = run(capsys, "convert", src, out, "--to", "megatron", "--tp", 2, "--pp", 3, "--iteration", 1000,
                     "--pipeline_first_stage_layers", 2)
    assert code == 0
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "1000"
    ranks = sorted(p.name for p in (out / "iter_0001000").iterdir())
    assert ranks == [f"mp_rank_{t:02d}_{p:03d}" for t in range(2) for p in range(3)]
    stage = [load_shard(out / "iter_0001000" / f"mp_rank_00_{p:03d}" / "model_optim_rng.pt") for p in range(3)]
    assert stage[0]["iteration"] == 1000 and stage[0]["checkpoint_version"] == 3.0
    args = stage[0]["args"]
    assert isinstance(args, argparse.Namespace) and args.tensor_model_parallel_size == 2
    assert (args.num_layers, args.num_query_groups, args.padded_vocab_size, args.swiglu) == (4, 4, 256, True)
    layers = [sorted({int(n.split(".")[2]) for n in s["model"] if n.startswith("decoder.layers.")}) for s in stage]
    assert layers == [[0, 1], [0], [0]]  # 2 + 1 + 1 layers, numbered from 0 on each stage
    assert "embedding.word_embeddings.weight" in stage[0]["model"] and "output_layer.weight" in stage[2]["model"]
    assert "decoder.final_layernorm.weight" in stage[2]["model"]


def test_tied_head_is_written_only_where_megatron_keeps_a_copy(tmp_path):
    lm = load_pretrained(family_dir(tmp_path, "qwen2"), dtype="float32", device="cpu")
    state = lm.model.state_dict()
    one_stage = to_megatron(state, lm.config, MegatronSplit())
    assert "output_layer.weight" not in one_stage[0, 0]
    two_stages = to_megatron(state, lm.config, MegatronSplit(pp=2))
    assert torch.equal(two_stages[0, 1]["output_layer.weight"], two_stages[0, 0]["embedding.word_embeddings.weight"])


def test_legacy_layout_is_nested_as_megatron_lm_writes_it(capsys, tmp_path):
    out = tmp_path / "m"
    assert run(capsys, "convert", family_dir(tmp_path, "qwen2"), out, "--to", "megatron", "--layout", "legacy")[0] == 0
    model = load_shard(out / "release" / "mp_rank_00" / "model_optim_rng.pt")["model"]
    language_model = model["language_model"]
    assert language_model["embedding"]["word_embeddings"]["weight"].shape == (256, 64)
    assert "layers.0.self_attention.query_key_value.bias" in language_model["encoder"]
    assert "layers.1.mlp.dense_h_to_4h.weight" in language_model["encoder"]
    assert "output_layer" not in language_model  # tied, one stage


def test_te_names_fuse_the_norms_into_the_following_linear(tmp_path):
    lm = load_pretrained("tiny-llama", dtype="float32", device="cpu")
    names = set(to_megatron(lm.model.state_dict(), lm.config, MegatronSplit(te=True))[0, 0])
    assert {"decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
            "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"} <= names
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in names)


def test_megatron_checkpoint_without_config_json_reads_from_its_args(capsys, tmp_path):
    """A checkpoint Megatron wrote itself has no config.json: the model is built from its args."""
    for family in ("llama", "qwen2", "mistral"):
        src = family_dir(tmp_path, family)
        out = tmp_path / f"m-{family}"
        assert run(capsys, "convert", src, out, "--to", "megatron")[0] == 0
        (out / "config.json").unlink()
        with_config = load_pretrained(src, dtype="float32", device="cpu")
        from_args = load_config(out)
        differences = {f for f in ("vocab_size", "num_key_value_heads", "qkv_bias", "tie_word_embeddings",
                                   "sliding_window", "rope_theta", "norm_eps", "architecture", "head_dim")
                       if getattr(from_args, f) != getattr(with_config.config, f)}
        assert not differences, family
        _, state = read_megatron(out)
        assert all(torch.equal(state[n], t) for n, t in with_config.model.state_dict().items()
                   if n in state)


def test_chat_generate_and_train_load_a_megatron_checkpoint_directly(capsys, tmp_path, tiny_chat_dir):
    megatron = tmp_path / "megatron"
    assert run(capsys, "convert", tiny_chat_dir, megatron, "--to", "megatron", "--pp", 2)[0] == 0
    from_megatron_dir = load_pretrained(megatron, dtype="float32", device="cpu")
    from_hf_dir = load_pretrained(tiny_chat_dir, dtype="float32", device="cpu")
    ids = torch.tensor([[5, 9, 100, 7]])
    with torch.no_grad():
        assert torch.equal(from_megatron_dir.model(ids), from_hf_dir.model(ids))
    answers = []
    for model in (megatron, tiny_chat_dir):
        code, out, _ = run(capsys, "chat", "--model", model, "--query", "Hello", "--temperature", 0,
                           "--max_new_tokens", 8)
        assert code == 0
        answers.append(out)
    assert answers[0] == answers[1]
    data = tmp_path / "pt.json"
    data.write_text(json.dumps([{"text": "Megatron checkpoints train directly. " * 4}] * 4), encoding="utf-8")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"pt": {"file_name": "pt.json",
                                                                   "columns": {"prompt": "text"}}}))
    out = tmp_path / "trained"
    assert main(["train", "--stage", "pt", "--model_name_or_path", str(megatron), "--dataset", "pt",
                 "--dataset_dir", str(tmp_path), "--finetuning_type", "lora", "--cutoff_len", "32",
                 "--max_steps", "2", "--output_dir", str(out), "--report_to", "none"]) == 0
    assert (out / "adapter_model.safetensors").is_file()


def test_real_model_round_trip_is_bit_exact_and_loads_for_generation(capsys, tmp_path, real_gguf):
    """SmolLM2-135M: 9 heads in 3 query groups, so tp in {1, 3} (tp=2 cannot split 3 groups), pp=2, both
    layouts; from the GGUF to Megatron and back to the same Hugging Face files as a direct conversion."""
    direct = tmp_path / "direct"
    assert run(capsys, "convert", real_gguf, direct)[0] == 0
    reference = safetensors_of(direct)
    for tp, layout in ((3, "mcore"), (1, "legacy")):
        megatron, back = tmp_path / f"m-{tp}-{layout}", tmp_path / f"back-{tp}-{layout}"
        assert run(capsys, "convert", direct, megatron, "--to", "megatron", "--tp", tp, "--pp", 2,
                   "--layout", layout)[0] == 0
        assert run(capsys, "convert", megatron, back)[0] == 0
        returned = safetensors_of(back)
        assert returned.keys() == reference.keys()
        assert all(torch.equal(reference[n], returned[n]) for n in reference), (tp, layout)
    code, out, _ = run(capsys, "chat", "--model", tmp_path / "m-3-mcore", "--query", "What is the capital of France?",
                       "--temperature", 0, "--max_new_tokens", 16)
    assert code == 0 and "Paris" in out
    code, _, err = run(capsys, "convert", direct, tmp_path / "tp2", "--to", "megatron", "--tp", 2)
    assert code == 2 and "--tp 2 does not divide the model's 9 attention heads" in err


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("options,message", [
    (["--tp", "3"], "--tp 3 does not divide the model's 4 attention heads"),
    (["--tp", "4"], "--tp 4 does not divide the model's 2 query groups"),
    (["--pp", "3"], "pp=3 stages over 2 layers"),
    (["--pp", "2", "--pipeline_first_stage_layers", "2"], "leaves 0 layer(s)"),
    (["--layout", "legacy", "--te"], "the legacy layout has no such names"),
    (["--tp", "0"], "--tp: must be a positive integer"),
])
def test_bad_splits_are_refused_before_anything_is_written(capsys, tmp_path, options, message):
    src = family_dir(tmp_path, "llama")
    code, _, err = run(capsys, "convert", src, tmp_path / "m", "--to", "megatron", *options)
    assert code == 2 and message in err, err
    assert not (tmp_path / "m").exists()


def test_qk_norms_in_the_legacy_layout_and_ffn_not_divisible_are_refused(capsys, tmp_path):
    code, _, err = run(capsys, "convert", family_dir(tmp_path, "qwen3"), tmp_path / "m", "--to", "megatron",
                       "--layout", "legacy")
    assert code == 2 and "use --layout mcore" in err
    odd_ffn = save_hf_model(make_hf_model("llama", intermediate_size=127), tmp_path / "odd", byte_tokenizer())
    code, _, err = run(capsys, "convert", odd_ffn, tmp_path / "m", "--to", "megatron", "--tp", 2)
    assert code == 2 and "--tp 2 does not divide the model's 127 FFN features (intermediate_size)" in err


def test_megatron_options_without_to_megatron_are_refused(capsys, tmp_path):
    code, _, err = run(capsys, "convert", family_dir(tmp_path, "llama"), tmp_path / "out", "--tp", 2)
    assert code == 2 and "--tp: Megatron options, but the output is --to hf" in err


@pytest.fixture
def megatron_dir(capsys, tmp_path):
    out = tmp_path / "m"
    assert run(capsys, "convert", family_dir(tmp_path, "llama"), out, "--to", "megatron", "--tp", 2,
               "--iteration", 7)[0] == 0
    return out


def test_a_missing_rank_file_is_named(megatron_dir):
    (megatron_dir / "iter_0000007" / "mp_rank_01" / "model_optim_rng.pt").unlink()
    with pytest.raises(CheckpointError, match=r"mp_rank_01/model_optim_rng.pt: missing"):
        load_pretrained(megatron_dir)


def test_a_rank_file_holding_code_is_refused(megatron_dir):
    path = megatron_dir / "iter_0000007" / "mp_rank_01" / "model_optim_rng.pt"
    content = torch.load(path, weights_only=False)
    content["evil"] = print  # a global that weights_only=True will not call
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="mp_rank_01/model_optim_rng.pt: refused"):
        load_pretrained(megatron_dir)


def test_an_iteration_other_than_the_trackers_is_refused(megatron_dir):
    path = megatron_dir / "iter_0000007" / "mp_rank_01" / "model_optim_rng.pt"
    content = torch.load(path, weights_only=False)
    content["iteration"] = 6
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="holds iteration 6, but latest_checkpointed_iteration.txt names "
                                              "iteration 7"):
        load_pretrained(megatron_dir)


def test_a_tracker_naming_a_missing_iteration_or_garbage_is_named(megatron_dir):
    tracker = megatron_dir / "latest_checkpointed_iteration.txt"
    tracker.write_text("8")
    with pytest.raises(CheckpointError, match="names iteration 8, but .*iter_0000008 does not exist"):
        load_pretrained(megatron_dir)
    tracker.write_text("latest")
    with pytest.raises(CheckpointError, match="expected 'release' or an iteration number, got 'latest'"):
        load_pretrained(megatron_dir)


def test_a_missing_tensor_names_the_rank_file(megatron_dir):
    path = megatron_dir / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt"
    content = load_shard(path)
    del content["model"]["decoder.layers.1.mlp.linear_fc2.weight"]
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="mp_rank_00/model_optim_rng.pt has no tensor "
                                              "'decoder.layers.1.mlp.linear_fc2.weight'"):
        load_pretrained(megatron_dir)
