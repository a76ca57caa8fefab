"""Hugging Face directories: read, write, round trip through transformers, and each bad input's error."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.hf import config_from_hf, config_to_hf, save_hf_checkpoint
from danlu.checkpoints.load import load_pretrained
from danlu.cli.convert import convert
from tests.conftest import make_hf_model, save_hf_model

IDS = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(0))


def logits_of(model, ids=IDS):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("family,overrides", [
    ("llama", {"attention_bias": True}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("mistral", {"sliding_window": 4}),
    ("qwen3", {"head_dim": 32, "tie_word_embeddings": True}),
    ("qwen3", {"attention_bias": True, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}),
])
def test_export_round_trip_loads_in_transformers(tmp_path, family, overrides):
    hf = make_hf_model(family, **overrides)
    lm = load_pretrained(save_hf_model(hf, tmp_path / "src"), dtype="float32", device="cpu")
    out = save_hf_checkpoint(lm.model.state_dict(), lm.config, tmp_path / "out", torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == type(hf).__name__
    assert (logits_of(reloaded) - logits_of(hf)).abs().max().item() <= 1e-5
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


# Published config.json files (Qwen/Qwen3-0.6B, meta-llama/Llama-3.2-1B), less torch_dtype and version.
PUBLISHED_CONFIGS = {
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
        "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
        "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": True, "use_cache": True, "use_sliding_window": False,
        "vocab_size": 151936},
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 128256},
}


@pytest.mark.parametrize("preset", PUBLISHED_CONFIGS)
def test_published_config_reads_as_the_preset_and_is_written_back(preset):
    from danlu.models.presets import get_preset

    published = PUBLISHED_CONFIGS[preset]
    assert config_from_hf(published).replace(name=preset) == get_preset(preset)
    written = config_to_hf(get_preset(preset), torch.bfloat16)
    assert {key: written[key] for key in published} == published


def test_initializer_range_is_read_and_written():
    from danlu.models.presets import get_preset

    hf = config_to_hf(get_preset("tiny-qwen3").replace(initializer_range=0.01), torch.float32)
    assert hf["initializer_range"] == 0.01 and config_from_hf(hf).initializer_range == 0.01


def test_sharded_export_writes_index_and_reloads(tmp_path):
    hf = make_hf_model("llama")
    lm = load_pretrained(save_hf_model(hf, tmp_path / "src"), dtype="float32", device="cpu")
    out = save_hf_checkpoint(lm.model.state_dict(), lm.config, tmp_path / "out", torch.float32,
                             max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert (logits_of(load_pretrained(out, dtype="float32").model) - logits_of(hf)).abs().max() <= 1e-5
    assert (logits_of(AutoModelForCausalLM.from_pretrained(out)) - logits_of(hf)).abs().max() <= 1e-5


def test_reads_pytorch_model_bin(tmp_path):
    hf = make_hf_model("qwen2")
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    lm = load_pretrained(tmp_path, dtype="float32")
    assert (logits_of(lm.model) - logits_of(hf)).abs().max() <= 1e-5


def test_pytorch_model_bin_with_pickled_code_is_refused(tmp_path):
    hf = make_hf_model("llama")
    hf.config.save_pretrained(tmp_path)
    torch.save({"model.embed_tokens.weight": hf.state_dict()["model.embed_tokens.weight"], "evil": print},
               tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_pretrained(tmp_path)


def test_convert_to_bfloat16(tmp_path):
    hf = make_hf_model("llama")
    src = save_hf_model(hf, tmp_path / "src")
    out = convert(src, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = load_pretrained(out, dtype="auto")
    assert next(reloaded.model.parameters()).dtype == torch.float32  # auto on CPU computes in float32
    assert load_pretrained(out, dtype="bfloat16").model.lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="already exists"):
        convert(src, out, dtype="bfloat16")


# ------------------------------------------------------------------ bad input


@pytest.fixture
def good_dir(tmp_path):
    return save_hf_model(make_hf_model("llama"), tmp_path / "model")


def test_missing_directory_names_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_pretrained(tmp_path / "nothing-here")


def test_missing_config_json(good_dir):
    (good_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_pretrained(good_dir)


def test_invalid_config_json_names_line(good_dir):
    (good_dir / "config.json").write_text('{\n  "vocab_size": 256,\n  oops\n}')
    with pytest.raises(CheckpointError, match=r"config.json: invalid JSON at line 3"):
        load_pretrained(good_dir)


def test_unsupported_architecture(good_dir):
    config = json.loads((good_dir / "config.json").read_text())
    config.update(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    (good_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unsupported architecture.*GPTNeoXForCausalLM"):
        load_pretrained(good_dir)


def test_no_weight_files(good_dir):
    (good_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_pretrained(good_dir)


def test_truncated_safetensors_names_file(good_dir):
    path = good_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        load_pretrained(good_dir)


def test_shape_mismatch_names_tensor_and_shapes(good_dir):
    config = json.loads((good_dir / "config.json").read_text())
    config["intermediate_size"] = 96
    (good_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp.\w+_proj.weight' has shape \(\d+, \d+\), expected"):
        load_pretrained(good_dir)


def test_missing_tensor_is_named(tmp_path, good_dir):
    from safetensors.torch import load_file, save_file

    state = load_file(good_dir / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, good_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor.*model.layers.1.mlp.up_proj.weight"):
        load_pretrained(good_dir)


def test_index_naming_missing_shard(tmp_path):
    hf = make_hf_model("llama")
    lm = load_pretrained(save_hf_model(hf, tmp_path / "src"), dtype="float32")
    out = save_hf_checkpoint(lm.model.state_dict(), lm.config, tmp_path / "out", torch.float32,
                             max_shard_bytes=100_000)
    shards = sorted(out.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"missing: .*{shards[1].name}"):
        load_pretrained(out)


def test_export_refuses_unrepresentable_config(tmp_path):
    from danlu.models.presets import get_preset

    config = get_preset("tiny-llama").replace(mlp="gelu", architecture="llama")
    with pytest.raises(CheckpointError, match="mlp='gelu'"):
        save_hf_checkpoint({}, config, tmp_path / "out", torch.float32)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch,change,message", [
    ("llama", {"qk_norm": True}, "only Qwen3 has q/k norms"),
    ("qwen3", {"qk_norm": False}, "only Qwen3 has q/k norms"),
    ("qwen3", {"qkv_bias": True}, "qkv_bias must equal o_bias"),
    ("qwen3", {"mlp_bias": True}, "Qwen3 has no MLP bias"),
])
def test_export_refuses_what_the_family_cannot_hold(tmp_path, arch, change, message):
    from danlu.models.presets import get_preset

    config = get_preset(f"tiny-{arch}").replace(**change)
    with pytest.raises(CheckpointError, match=message):
        save_hf_checkpoint({}, config, tmp_path / "out", torch.float32)


def test_qwen_sliding_window_on_some_layers_is_refused():
    hf = {**PUBLISHED_CONFIGS["qwen3-0.6b"], "use_sliding_window": True, "sliding_window": 4096}
    with pytest.raises(CheckpointError, match="max_window_layers=28"):
        config_from_hf(hf)


def test_failed_export_leaves_no_partial_directory(tmp_path, monkeypatch):
    hf = make_hf_model("llama")
    lm = load_pretrained(save_hf_model(hf, tmp_path / "src"), dtype="float32")
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_hf_checkpoint(lm.model.state_dict(), lm.config, tmp_path / "out", torch.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_hub_id_offline_error_says_how_to_use_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="(?s)could not be fetched from huggingface.*--model PATH"):
        load_pretrained("Qwen/Qwen2-0.5B-Instruct")


def test_unknown_hub_name():
    with pytest.raises(ValueError, match="unknown hub"):
        load_pretrained("owner/model", hub="nohub")
