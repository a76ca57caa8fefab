"""BERT checkpoints: BertModel's config.json and tensor names read into danlu's one Transformer, written back so
that transformers loads them whole, and each bad input's error."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.hf import config_from_hf, config_to_hf, danlu_tensor_name, hf_tensor_name, save_hf_checkpoint
from danlu.checkpoints.load import load_pretrained
from danlu.models.presets import get_preset
from danlu.models.transformer import Transformer
from tests.models.test_encoder import bert_tokenizer, make_hf_bert

IDS = torch.randint(5, 256, (2, 11), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 11, [1] * 7 + [0] * 4])

# all-MiniLM-L6-v2's config.json as published (less transformers_version).
MINILM_CONFIG = {
    "_name_or_path": "nreimers/MiniLM-L6-H384-uncased", "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1, "gradient_checkpointing": False, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 384, "initializer_range": 0.02, "intermediate_size": 1536,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 6, "pad_token_id": 0, "position_embedding_type": "absolute", "type_vocab_size": 2,
    "use_cache": True, "vocab_size": 30522}


def hidden_of(model, ids=IDS, mask=MASK):
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def saved_bert(tmp_path, model=None, tokenizer=True):
    model = model if model is not None else make_hf_bert()
    model.save_pretrained(tmp_path / "src")
    if tokenizer:
        bert_tokenizer().save_pretrained(tmp_path / "src")
    return model, tmp_path / "src"


def reload_in_transformers(directory):
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


# ---------------------------------------------------------------- config.json

def test_the_published_minilm_config_is_the_preset():
    assert config_from_hf(MINILM_CONFIG).replace(name="all-minilm-l6-v2") == get_preset("all-minilm-l6-v2")


def test_the_preset_writes_a_config_transformers_reads_as_bert():
    import transformers

    hf = config_to_hf(get_preset("all-minilm-l6-v2"), torch.float32)
    config = transformers.AutoConfig.for_model(**hf)
    assert type(config).__name__ == "BertConfig"
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act", "pad_token_id"):
        assert getattr(config, key) == MINILM_CONFIG[key], key
    assert config_from_hf(hf) == get_preset("all-minilm-l6-v2").replace(name="")


def test_the_tanh_gelu_is_read_and_written_as_such():
    config = config_from_hf({**MINILM_CONFIG, "hidden_act": "gelu_new"})
    assert config.mlp == "gelu"
    assert config_to_hf(config, torch.float32)["hidden_act"] == "gelu_pytorch_tanh"


@pytest.mark.parametrize("change,message", [
    ({"num_attention_heads": None}, r"missing field\(s\) \['num_attention_heads'\]"),
    ({"position_embedding_type": "relative_key"},
     "position_embedding_type 'relative_key' is not supported.*'absolute'"),
    ({"position_embedding_type": "relative_key_query"}, "position_embedding_type 'relative_key_query'"),
    ({"hidden_act": "relu"}, r"hidden_act 'relu' is not supported for BERT.*\['gelu'"),
    ({"is_decoder": True}, "BERT as a decoder"),
    ({"type_vocab_size": -2}, "type_vocab_size must be a non-negative integer"),
    ({"hidden_size": 100}, "hidden_size .100. is not divisible by num_attention_heads"),
])
def test_bad_bert_config_is_refused_naming_the_field(tmp_path, change, message):
    hf = {k: v for k, v in {**MINILM_CONFIG, **change}.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=f"config.json: .*{message}"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("change,message", [
    ({"num_key_value_heads": 2}, "no grouped-query attention"),
    ({"norm_position": "pre"}, "norm_position='pre' .BERT has 'post'"),
    ({"mlp": "swiglu"}, "mlp='swiglu'"),
    ({"type_vocab_size": 0}, "type_vocab_size=0"),
    ({"causal": True}, "causal=True"),
    ({"hidden_size": 32}, r"head_dim is hidden_size // num_attention_heads \(8\), got head_dim=16 .*head_dim=None"),
])
def test_export_refuses_what_bert_cannot_hold(tmp_path, change, message):
    with pytest.raises(CheckpointError, match=f"cannot be written as a Hugging Face BertModel: .*{message}"):
        save_hf_checkpoint({}, get_preset("tiny-bert").replace(**change), tmp_path / "out", torch.float32)
    assert not (tmp_path / "out").exists()


def test_export_refuses_encoder_switches_in_a_decoder_family(tmp_path):
    config = get_preset("tiny-llama").replace(causal=False, norm_position="post")
    with pytest.raises(CheckpointError, match="LlamaForCausalLM: causal=False .*norm_position='post'"):
        save_hf_checkpoint({}, config, tmp_path / "out", torch.float32)


# ---------------------------------------------------------------- tensor names

def test_tensor_names_map_onto_bertmodels_both_ways():
    import transformers

    config = get_preset("tiny-bert")
    ours = list(Transformer(config).state_dict())
    hf_config = transformers.AutoConfig.for_model(**config_to_hf(config, torch.float32))
    theirs = set(transformers.BertModel(hf_config).state_dict())
    assert {hf_tensor_name(n, "bert") for n in ours} == theirs
    assert all(danlu_tensor_name(hf_tensor_name(n, "bert"), "bert") == n for n in ours)
    assert danlu_tensor_name("bert.encoder.layer.1.output.LayerNorm.bias", "bert") == \
        "model.layers.1.post_attention_layernorm.bias"
    assert danlu_tensor_name("encoder.layer.0.attention.self.rotary.weight", "bert") is None
    assert hf_tensor_name("model.layers.3.mlp.gate_proj.weight", "llama") == "model.layers.3.mlp.gate_proj.weight"


# ---------------------------------------------------------------- load and write

def test_load_gives_the_encoder_with_its_tokenizer(tmp_path):
    hf, directory = saved_bert(tmp_path)
    lm = load_pretrained(directory, dtype="float32", device="cpu")
    assert lm.config.architecture == "bert" and lm.model.lm_head is None and lm.config.add_pooling_layer
    assert type(lm.tokenizer).__name__ == "BertTokenizer"
    assert lm.tokenizer("the cat")["input_ids"] == [2, 31, 32, 3]
    assert max_diff(hidden_of(lm.model), hidden_of(hf)) <= 1e-5


def test_round_trip_loads_in_transformers_whole(tmp_path):
    hf, directory = saved_bert(tmp_path)
    lm = load_pretrained(directory, dtype="float32", device="cpu")
    out = save_hf_checkpoint(lm.model.state_dict(), lm.config, tmp_path / "out", torch.float32,
                             tokenizer=lm.tokenizer)
    assert not (out / "generation_config.json").exists()  # an encoder does not generate
    reloaded, info = reload_in_transformers(out)
    assert type(reloaded).__name__ == "BertModel"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        expected = hf(IDS, attention_mask=MASK, output_hidden_states=True)
        actual = reloaded(IDS, attention_mask=MASK, output_hidden_states=True)
    for theirs, again in zip(expected.hidden_states, actual.hidden_states):
        assert max_diff(again, theirs) <= 1e-6
    assert max_diff(actual.pooler_output, expected.pooler_output) <= 1e-6
    assert load_file(str(out / "model.safetensors")).keys() == load_file(str(directory / "model.safetensors")).keys()


@pytest.mark.parametrize("shape", [
    dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64),  # a distilled student
    dict(num_hidden_layers=3, hidden_size=48, num_attention_heads=4, intermediate_size=96, type_vocab_size=1),
])
def test_an_encoder_built_from_a_config_is_written_for_transformers(tmp_path, shape):
    # None: derived again from the new hidden_size and num_attention_heads
    config = get_preset("tiny-bert").replace(head_dim=None, num_key_value_heads=None, **shape)
    torch.manual_seed(0)
    student = Transformer(config)
    student.init_weights()
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    student.eval()
    out = save_hf_checkpoint(student.state_dict(), config, tmp_path / "student", torch.float32, max_shard_bytes=20_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded, with an index of BERT's names
    reloaded, info = reload_in_transformers(out)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert max_diff(hidden_of(reloaded), hidden_of(student)) <= 1e-5
    again = load_pretrained(out, dtype="float32", device="cpu")
    assert again.config == config.replace(name="")
    assert max_diff(hidden_of(again.model), hidden_of(student)) == 0


def test_a_checkpoint_without_the_pooler_loads_without_it(tmp_path):
    import transformers

    hf = transformers.BertModel(make_hf_bert().config, add_pooling_layer=False).eval()
    hf.load_state_dict(make_hf_bert().state_dict(), strict=False)
    _, directory = saved_bert(tmp_path, hf, tokenizer=False)
    lm = load_pretrained(directory, dtype="float32", device="cpu")
    assert not lm.config.add_pooling_layer and lm.model.pooler is None and lm.tokenizer is None
    assert max_diff(hidden_of(lm.model), hidden_of(hf)) <= 1e-5


def test_a_bert_task_models_encoder_is_read(tmp_path):
    """BertForMaskedLM keeps the encoder under `bert.` (without the pooler) beside its head (cls.*)."""
    import transformers

    hf = transformers.BertForMaskedLM(make_hf_bert().config).eval()
    hf.bert.load_state_dict(make_hf_bert().state_dict(), strict=False)
    hf.save_pretrained(tmp_path / "mlm")
    lm = load_pretrained(tmp_path / "mlm", dtype="float32", device="cpu")
    assert lm.config.architecture == "bert" and not lm.config.add_pooling_layer
    assert max_diff(hidden_of(lm.model), hidden_of(hf.bert)) <= 1e-5


def test_the_legacy_position_ids_buffer_is_skipped(tmp_path):
    hf, directory = saved_bert(tmp_path, tokenizer=False)
    state = load_file(str(directory / "model.safetensors"))
    state["embeddings.position_ids"] = torch.arange(64)[None]  # what transformers 4.x wrote
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    assert max_diff(hidden_of(load_pretrained(directory, dtype="float32").model), hidden_of(hf)) <= 1e-5


def test_a_wrong_shaped_tensor_names_the_file_and_the_tensor(tmp_path):
    _, directory = saved_bert(tmp_path, tokenizer=False)
    path = directory / "model.safetensors"
    state = load_file(str(path))
    state["encoder.layer.1.intermediate.dense.weight"] = torch.zeros(100, 64)
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'encoder\.layer\.1\.intermediate\.dense"
                                              r"\.weight' has shape \(100, 64\), expected \(128, 64\)"):
        load_pretrained(directory)


def test_a_missing_or_unknown_tensor_is_named_as_the_checkpoint_names_it(tmp_path):
    _, directory = saved_bert(tmp_path, tokenizer=False)
    path = directory / "model.safetensors"
    state = load_file(str(path))
    del state["encoder.layer.2.output.dense.bias"]
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) encoder\.layer\.2\.output\.dense\.bias"):
        load_pretrained(directory)
    state["encoder.layer.2.output.dense.bias"] = torch.zeros(64)
    state["encoder.layer.0.attention.self.distance_embedding.weight"] = torch.zeros(127, 16)
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected tensor 'encoder.layer.0.attention.self.distance_embedding"):
        load_pretrained(directory)
