"""transformers' torchao checkpoints: danlu writes them from QuantizedWeights, transformers loads them on CPU and
computes what the dequantized model computes, and danlu reads them back, also those transformers wrote itself.

Tolerances. In float32, symmetric weights (int8 per row, int4) load bit for bit: torchao dequantizes q * scale in
float32 as QuantizedWeight.dequantize does. An asymmetric weight's float zero z is stored as torchao's float zero
point -z / scale, so it comes back within a few float32 ulps of the weight (ASYMMETRIC_ULPS). Logits: 1e-5 (the
Int8Tensor linear scales x @ q after the product, the float model before). In bfloat16 the model's dtype rounds the
dequantized weight, and torchao rounds the float zero point to bfloat16 first: within bfloat16's eps times the
largest weight (1 to 2 ulps). bfloat16 logits: 2e-2 (every product and sum rounded to 8 bits, in other orders).
"""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, TorchAoConfig

from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.hf import config_from_hf, read_hf_config, save_hf_checkpoint
from danlu.checkpoints.torchao import (check_quantization_config, is_torchao_checkpoint, read_torchao_checkpoint,
                                       save_torchao_checkpoint)
from danlu.quantization.weights import QuantizedWeight, quantize_weight
from tests.conftest import make_hf_model

torchao_quantization = pytest.importorskip("torchao.quantization")

IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
ASYMMETRIC_ULPS = 4
METHODS = {  # name: (bits, group_size, symmetric, torchao class, torchao config)
    "int8": (8, None, True, "Int8Tensor", "Int8WeightOnlyConfig"),
    "int4": (4, 32, False, "IntxUnpackedToInt8Tensor", "IntxWeightOnlyConfig"),
}


def is_linear_weight(name: str) -> bool:
    return name.endswith("_proj.weight")


def quantized_state(hf_model, bits, group_size, symmetric) -> dict:
    return {name: quantize_weight(t, bits, group_size, symmetric) if is_linear_weight(name) else t
            for name, t in hf_model.state_dict().items()}


def dequantized_model(hf_model, state, dtype, untied=False):
    """The float transformers model whose linears hold QuantizedWeight.dequantize(): the reference (`untied`:
    its own head beside the embedding, as a quantized head of a tied model is written)."""
    config = copy.deepcopy(hf_model.config)
    if untied:
        config.tie_word_embeddings = False
    reference = type(hf_model)(config).eval().to(dtype)
    reference.load_state_dict({name: value.dequantize(dtype) if isinstance(value, QuantizedWeight) else value.to(dtype)
                               for name, value in state.items()})
    return reference


def logits_of(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def torchao_dequantized(model, name: str) -> torch.Tensor:
    return model.get_submodule(name.removesuffix(".weight")).weight.dequantize().float()


def assert_weight_close(loaded, ours: QuantizedWeight, dtype, context=""):
    expected = ours.dequantize(dtype).float()
    if dtype == torch.bfloat16:
        atol = torch.finfo(torch.bfloat16).eps * expected.abs().max().item()  # 1 to 2 ulps of the largest weight
    elif ours.symmetric:
        atol = 0.0
    else:
        atol = ASYMMETRIC_ULPS * torch.finfo(torch.float32).eps * expected.abs().max().item()
    torch.testing.assert_close(loaded.float(), expected, rtol=0, atol=atol, msg=lambda m: f"{context}: {m}")


@pytest.fixture(scope="module")
def hf_llama():
    return make_hf_model("llama")  # hidden 64, 2 layers, vocab 256


def save_quantized(hf_model, method, directory, dtype=torch.float32):
    bits, group_size, symmetric, _, _ = METHODS[method]
    state = quantized_state(hf_model, bits, group_size, symmetric)
    save_torchao_checkpoint(state, config_from_hf(hf_model.config.to_dict()), directory, dtype)
    return state


@pytest.mark.parametrize("method", sorted(METHODS))
def test_transformers_loads_danlu_checkpoint(tmp_path, hf_llama, method):
    state = save_quantized(hf_llama, method, tmp_path / "out")
    _, _, _, torchao_class, config_name = METHODS[method]
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["quantization_config"]["quant_method"] == "torchao"
    assert written["quantization_config"]["quant_type"]["default"]["_type"] == config_name

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu").eval()
    for name, ours in state.items():
        if isinstance(ours, QuantizedWeight):
            assert type(loaded.get_submodule(name.removesuffix(".weight")).weight).__name__ == torchao_class
            assert_weight_close(torchao_dequantized(loaded, name), ours, torch.float32, name)
        else:
            assert torch.equal(loaded.state_dict()[name], ours), name
    reference = dequantized_model(hf_llama, state, torch.float32)
    torch.testing.assert_close(logits_of(loaded), logits_of(reference), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_transformers_loads_danlu_checkpoint_in_bfloat16(tmp_path, hf_llama, method):
    state = save_quantized(hf_llama, method, tmp_path / "out", torch.bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu").eval()
    assert loaded.dtype == torch.bfloat16
    for name, ours in state.items():
        if isinstance(ours, QuantizedWeight):
            assert_weight_close(torchao_dequantized(loaded, name), ours, torch.bfloat16, name)
    reference = dequantized_model(hf_llama, state, torch.bfloat16)
    # bfloat16 activations: both round every product and sum to 8 bits, in different orders
    torch.testing.assert_close(logits_of(loaded), logits_of(reference), rtol=0, atol=2e-2)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_danlu_reads_its_own_checkpoint_back(tmp_path, hf_llama, method):
    state = save_quantized(hf_llama, method, tmp_path / "out")
    assert is_torchao_checkpoint(tmp_path / "out")
    back = read_torchao_checkpoint(tmp_path / "out")
    assert set(back) == set(state)
    for name, ours in state.items():
        if isinstance(ours, QuantizedWeight):
            got = back[name]
            assert isinstance(got, QuantizedWeight), name
            assert (got.bits, got.group_size, got.in_features) == (ours.bits, ours.group_size, ours.in_features)
            assert torch.equal(got.codes, ours.codes) and torch.equal(got.scales, ours.scales), name
            assert_weight_close(got.dequantize(), ours, torch.float32, name)
        else:
            assert torch.equal(back[name], ours), name


TRANSFORMERS_CONFIGS = {
    "Int8WeightOnlyConfig": lambda ao: ao.Int8WeightOnlyConfig(),
    "IntxWeightOnlyConfig-int4-asymmetric": lambda ao: ao.IntxWeightOnlyConfig(
        weight_dtype=torch.int4, granularity=ao.PerGroup(32), mapping_type=ao.MappingType.ASYMMETRIC),
    "IntxWeightOnlyConfig-int4-symmetric": lambda ao: ao.IntxWeightOnlyConfig(
        weight_dtype=torch.int4, granularity=ao.PerGroup(32)),
}


@pytest.mark.parametrize("quant_type", sorted(TRANSFORMERS_CONFIGS))
def test_danlu_reads_what_transformers_wrote(tmp_path, hf_llama, quant_type):
    hf_llama.save_pretrained(tmp_path / "float")
    config = TorchAoConfig(TRANSFORMERS_CONFIGS[quant_type](torchao_quantization))
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=torch.float32, device_map="cpu",
                                                     quantization_config=config).eval()
    quantized.save_pretrained(tmp_path / "quantized")

    assert is_torchao_checkpoint(tmp_path / "quantized")
    back = read_torchao_checkpoint(tmp_path / "quantized")
    transformers_state = quantized.state_dict()
    assert set(back) == set(transformers_state)
    for name, value in back.items():
        if is_linear_weight(name):
            assert isinstance(value, QuantizedWeight), name
            # torchao: (q - zero_point) * scale; ours: q * scale + zero, with zero = -zero_point * scale
            expected = torchao_dequantized(quantized, name)
            atol = ASYMMETRIC_ULPS * torch.finfo(torch.float32).eps * expected.abs().max().item()
            torch.testing.assert_close(value.dequantize(), expected, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(value, transformers_state[name]), name


def test_a_float_directory_is_not_a_torchao_checkpoint(tmp_path, hf_llama):
    hf_llama.save_pretrained(tmp_path / "float")
    assert not is_torchao_checkpoint(tmp_path / "float")
    assert not is_torchao_checkpoint(tmp_path / "nothing-here")
    with pytest.raises(CheckpointError, match="no quantization_config"):
        read_torchao_checkpoint(tmp_path / "float")


def edit_quantization_config(directory, edit):
    path = directory / "config.json"
    hf = json.loads(path.read_text())
    edit(hf["quantization_config"])
    path.write_text(json.dumps(hf))
    return path


def test_other_quant_method_is_refused_naming_the_file(tmp_path, hf_llama):
    save_quantized(hf_llama, "int8", tmp_path / "out")
    path = edit_quantization_config(tmp_path / "out", lambda q: q.update(quant_method="gptq"))
    assert not is_torchao_checkpoint(tmp_path / "out")
    with pytest.raises(CheckpointError, match=f"{path}: quantization_config.quant_method is 'gptq'"):
        read_torchao_checkpoint(tmp_path / "out")


def test_unsupported_torchao_config_is_refused(tmp_path, hf_llama):
    save_quantized(hf_llama, "int8", tmp_path / "out")
    path = edit_quantization_config(tmp_path / "out",
                                    lambda q: q["quant_type"]["default"].update(_type="Int4WeightOnlyConfig"))
    with pytest.raises(CheckpointError, match=f"{path}: torchao config 'Int4WeightOnlyConfig' is not one danlu reads"):
        read_torchao_checkpoint(tmp_path / "out")


def test_unsupported_tensor_subclass_is_refused_naming_file_and_tensor(tmp_path, hf_llama):
    save_quantized(hf_llama, "int4", tmp_path / "out")
    weights = tmp_path / "out" / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    name = "model.layers.0.mlp.up_proj.weight"
    entry = json.loads(metadata[name])
    metadata[name] = json.dumps({**entry, "_type": "Int4TilePackedTo4dTensor"})
    save_file(tensors, str(weights), metadata=metadata)
    with pytest.raises(CheckpointError, match=f"{weights}: tensor '{name}' is a torchao Int4TilePackedTo4dTensor"):
        read_torchao_checkpoint(tmp_path / "out")


def test_a_float_safetensors_file_is_refused(tmp_path, hf_llama):
    config = config_from_hf(hf_llama.config.to_dict())
    save_hf_checkpoint(hf_llama.state_dict(), config, tmp_path / "out", torch.float32)
    save_quantized(hf_llama, "int8", tmp_path / "quantized")
    (tmp_path / "out" / "config.json").write_text((tmp_path / "quantized" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no torchao metadata"):
        read_torchao_checkpoint(tmp_path / "out")


def test_weights_torchao_cannot_hold_are_refused_before_writing(tmp_path, hf_llama):
    config = config_from_hf(hf_llama.config.to_dict())
    state = quantized_state(hf_llama, 4, 32, False)
    state["model.layers.0.mlp.down_proj.weight"] = quantize_weight(torch.randn(64, 100), 4, 32, False)
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.down_proj.weight: in_features 100"):
        save_torchao_checkpoint(state, config, tmp_path / "out", torch.float32)
    assert not (tmp_path / "out").exists()


def test_a_group_size_that_does_not_divide_in_features_is_refused_naming_the_ones_that_do(tmp_path, hf_llama):
    # SmolLM2-135M: hidden 576, danlu's int4 default group 128; torchao has no shorter last group, and a weight
    # padded to 640 input columns would load into the 576-wide Linear and fail in its forward
    config = config_from_hf(hf_llama.config.to_dict())
    state = quantized_state(hf_llama, 4, 32, False)
    state["model.layers.1.self_attn.o_proj.weight"] = quantize_weight(torch.randn(64, 576), 4, 128, False)
    with pytest.raises(CheckpointError) as raised:
        save_torchao_checkpoint(state, config, tmp_path / "out", torch.float32)
    message = str(raised.value)
    assert message.startswith("model.layers.1.self_attn.o_proj.weight: in_features 576 is not a multiple of the "
                              "group size 128"), message
    assert "Group sizes that divide 576: 8, 16, 32, 64, or one group per row" in message, message
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- mixed kinds, quantized head of a tied model

BODY = (4, 32, False)  # danlu's int4 body / GGUF Q4_1: int4, group 32, asymmetric
HEAD = (8, None, True)  # the head at 8 bits, per row, symmetric (Int8WeightOnlyConfig)


@pytest.fixture(scope="module")
def hf_tied_llama():
    model = make_hf_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def mixed_state(hf_model) -> dict:
    """int4 g32 asymmetric linears and an int8 per-row head; the head of a tied model is the embedding's values."""
    state = quantized_state(hf_model, *BODY)
    state["lm_head.weight"] = quantize_weight(hf_model.lm_head.weight, *HEAD)
    return state


def save_mixed(hf_model, directory):
    state = mixed_state(hf_model)
    save_torchao_checkpoint(state, config_from_hf(hf_model.config.to_dict()), directory, torch.float32)
    return state


# transformers builds the FqnToConfig back from config.json, and torchao 0.18 warns that "_default" is deprecated
@pytest.mark.filterwarnings("ignore:Config Deprecation")
def test_mixed_kinds_with_a_quantized_tied_head_load_in_transformers(tmp_path, hf_tied_llama):
    state = save_mixed(hf_tied_llama, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["tie_word_embeddings"] is False
    quantization = written["quantization_config"]
    assert quantization["modules_to_not_convert"] == []  # None would be transformers' default skips: the head
    assert quantization["untie_embedding_weights"] is False  # the embedding stays float
    per_module = quantization["quant_type"]["default"]
    assert per_module["_type"] == "FqnToConfig"
    configs = per_module["_data"]["fqn_to_config"]
    assert per_module["_data"]["module_fqn_to_config"] == configs
    assert list(configs) == ["_default", "lm_head"]
    assert configs["_default"]["_type"] == "IntxWeightOnlyConfig"
    assert configs["_default"]["_data"]["granularity"] == {"_type": "PerGroup", "_version": 1,
                                                           "_data": {"group_size": 32}}
    assert configs["_default"]["_data"]["mapping_type"]["_data"] == "ASYMMETRIC"
    assert configs["lm_head"]["_type"] == "Int8WeightOnlyConfig"

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu").eval()
    assert loaded.config.tie_word_embeddings is False
    assert type(loaded.lm_head.weight).__name__ == "Int8Tensor"
    assert torch.equal(loaded.model.embed_tokens.weight, hf_tied_llama.model.embed_tokens.weight)
    for name, ours in state.items():
        if isinstance(ours, QuantizedWeight):
            expected_class = "Int8Tensor" if name == "lm_head.weight" else "IntxUnpackedToInt8Tensor"
            assert type(loaded.get_submodule(name.removesuffix(".weight")).weight).__name__ == expected_class, name
            assert_weight_close(torchao_dequantized(loaded, name), ours, torch.float32, name)
    reference = dequantized_model(hf_tied_llama, state, torch.float32, untied=True)
    torch.testing.assert_close(logits_of(loaded), logits_of(reference), rtol=0, atol=1e-5)


def test_danlu_reads_mixed_kinds_and_the_untied_head_back_exactly(tmp_path, hf_tied_llama):
    state = save_mixed(hf_tied_llama, tmp_path / "out")
    assert read_hf_config(tmp_path / "out").tie_word_embeddings is False
    back = read_torchao_checkpoint(tmp_path / "out")
    assert set(back) == set(state)  # the head as well as the embedding: untied
    assert torch.equal(back["model.embed_tokens.weight"], hf_tied_llama.model.embed_tokens.weight)
    for name, ours in state.items():
        got = back[name]
        if not isinstance(ours, QuantizedWeight):
            assert torch.equal(got, ours), name
            continue
        assert isinstance(got, QuantizedWeight), name
        assert (got.bits, got.group_size, got.in_features) == (ours.bits, ours.group_size, ours.in_features), name
        assert torch.equal(got.codes, ours.codes) and torch.equal(got.scales, ours.scales), name
        if ours.symmetric:
            assert got.zeros is None, name
        else:  # z -> torchao's zero point -z / s -> -zero_point * s: two float32 roundings of z
            eps = torch.finfo(torch.float32).eps
            torch.testing.assert_close(got.zeros, ours.zeros, rtol=ASYMMETRIC_ULPS * eps, atol=0,
                                       msg=lambda m: f"{name}: {m}")
        assert_weight_close(got.dequantize(), ours, torch.float32, name)


def transformers_mixed_checkpoint(hf_tied_model, tmp_path):
    """What transformers writes for the same model: untied by hand (torchao's recipe for quantizing a tied
    head), then quantized by TorchAoConfig(FqnToConfig({"_default": int4 g32 asymmetric, "lm_head": int8}),
    modules_to_not_convert=[])."""
    ao = torchao_quantization
    untied = copy.deepcopy(hf_tied_model)
    untied.lm_head.weight = torch.nn.Parameter(untied.model.embed_tokens.weight.detach().clone())
    untied.config.tie_word_embeddings = False
    untied.save_pretrained(tmp_path / "untied")
    body = ao.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=ao.PerGroup(32),
                                   mapping_type=ao.MappingType.ASYMMETRIC, scale_dtype=torch.float32)
    with pytest.warns(UserWarning, match="_default is deprecated"):
        quant_type = ao.FqnToConfig({"_default": body, "lm_head": ao.Int8WeightOnlyConfig()})
    config = TorchAoConfig(quant_type, modules_to_not_convert=[])
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "untied", dtype=torch.float32, device_map="cpu",
                                                     quantization_config=config).eval()
    quantized.save_pretrained(tmp_path / "transformers")
    return quantized, tmp_path / "transformers"


def safetensors_layout(directory):
    """{tensor: (dtype, shape)}, {tensor name: its torchao metadata entry} of model.safetensors."""
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: (f.get_tensor(key).dtype, tuple(f.get_tensor(key).shape)) for key in f.keys()}
    entries = {}
    for name in json.loads(metadata["tensor_names"]):
        entry = json.loads(metadata[name])
        entry["_tensor_data_names"] = sorted(entry.get("_tensor_data_names", []))
        entries[name] = entry
    return tensors, entries


def test_mixed_checkpoint_is_what_transformers_writes(tmp_path, hf_tied_llama):
    quantized, theirs = transformers_mixed_checkpoint(hf_tied_llama, tmp_path)
    assert quantized.config.tie_word_embeddings is False and type(quantized.lm_head.weight).__name__ == "Int8Tensor"
    save_mixed(hf_tied_llama, tmp_path / "ours")
    our_config = json.loads((tmp_path / "ours" / "config.json").read_text())
    their_config = json.loads((theirs / "config.json").read_text())
    assert our_config["quantization_config"] == their_config["quantization_config"]
    assert our_config["tie_word_embeddings"] is their_config["tie_word_embeddings"] is False

    our_tensors, our_entries = safetensors_layout(tmp_path / "ours")
    their_tensors, their_entries = safetensors_layout(theirs)
    assert our_entries == their_entries
    assert set(our_tensors) == set(their_tensors)
    for key, layout in our_tensors.items():
        if key.endswith("_proj._weight_zero_point"):
            # asymmetric: torchao's AFFINE rounds its zero points to int8; danlu's float zeros stay float
            assert (layout[0], their_tensors[key][0]) == (torch.float32, torch.int8), key
            assert layout[1] == their_tensors[key][1], key
        else:
            assert layout == their_tensors[key], key


def test_danlu_reads_the_mixed_checkpoint_transformers_wrote(tmp_path, hf_tied_llama):
    quantized, theirs = transformers_mixed_checkpoint(hf_tied_llama, tmp_path)
    back = read_torchao_checkpoint(theirs)
    assert set(back) == set(quantized.state_dict())
    assert isinstance(back["lm_head.weight"], QuantizedWeight) and back["lm_head.weight"].bits == 8
    assert back["lm_head.weight"].symmetric
    for name, value in back.items():
        if name == "lm_head.weight" or is_linear_weight(name):
            assert isinstance(value, QuantizedWeight), name
            expected = torchao_dequantized(quantized, name)
            atol = ASYMMETRIC_ULPS * torch.finfo(torch.float32).eps * expected.abs().max().item()
            torch.testing.assert_close(value.dequantize(), expected, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(value, quantized.state_dict()[name]), name


def test_danlu_reads_a_tied_model_transformers_quantized(tmp_path, hf_tied_llama):
    # transformers lists the tied lm_head.weight in the torchao metadata but stores it once, as the embedding
    hf_tied_llama.save_pretrained(tmp_path / "float")
    config = TorchAoConfig(TRANSFORMERS_CONFIGS["IntxWeightOnlyConfig-int4-asymmetric"](torchao_quantization))
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=torch.float32, device_map="cpu",
                                                     quantization_config=config).eval()
    quantized.save_pretrained(tmp_path / "quantized")
    with safe_open(str(tmp_path / "quantized" / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" in json.loads(f.metadata()["tensor_names"]) and "lm_head.weight" not in f.keys()
    back = read_torchao_checkpoint(tmp_path / "quantized")
    assert "lm_head.weight" not in back
    assert torch.equal(back["model.embed_tokens.weight"], hf_tied_llama.model.embed_tokens.weight)
    assert all(isinstance(back[name], QuantizedWeight) for name in back if is_linear_weight(name))


def test_a_per_module_config_with_a_config_danlu_cannot_read_is_refused_naming_the_module(tmp_path,
                                                                                          hf_tied_llama):
    save_mixed(hf_tied_llama, tmp_path / "out")

    def edit(quantization):
        for key in ("fqn_to_config", "module_fqn_to_config"):
            quantization["quant_type"]["default"]["_data"][key]["lm_head"]["_type"] = "Float8WeightOnlyConfig"

    path = edit_quantization_config(tmp_path / "out", edit)
    with pytest.raises(CheckpointError, match=f"{path}: torchao config 'Float8WeightOnlyConfig' \\(for 'lm_head'\\)"):
        read_torchao_checkpoint(tmp_path / "out")
    # a module left float (None) is fine; an old ModuleFqnToConfig with module_fqn_to_config only too
    body = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    body["quant_type"]["default"] = {"_type": "ModuleFqnToConfig", "_data": {"module_fqn_to_config": {
        "_default": body["quant_type"]["default"]["_data"]["fqn_to_config"]["_default"], "lm_head": None}}}
    check_quantization_config(body, "config.json")
