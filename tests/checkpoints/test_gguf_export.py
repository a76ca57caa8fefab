"""GGUF export: danlu's models written as llama.cpp's convert_hf_to_gguf.py writes them, and read back by danlu and
by the gguf package's own reader (the one llama.cpp's tools use)."""
import math
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, LlamaFileType, TokenType

from danlu.checkpoints import gguf as gguf_format
from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.load import expected_shapes, load_pretrained, model_from_state_dict
from danlu.cli.convert import convert
from danlu.cli.main import main
from danlu.models.config import ModelConfig
from danlu.models.transformer import Transformer
from tests.conftest import CHATML, byte_tokenizer, make_hf_model, save_hf_model

VOCAB_SIZE = 272  # beyond the tokenizer's 265 ids: the rest are written as llama.cpp's [PAD<id>] tokens
FAMILIES = {
    "llama": {},
    "qwen2": dict(tie_word_embeddings=True),  # q/k/v biases, no output matrix
    "qwen3": dict(head_dim=32),  # q/k norms; head_dim is not hidden_size / heads
    "mistral": {},  # written as llama, as convert_hf_to_gguf does
}
GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
             "mistral": gguf.MODEL_ARCH.LLAMA}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, the world!"}]


@pytest.fixture(autouse=True)
def no_gguf_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DANLU_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DANLU_GGUF_CACHE", "0")


def chat_tokenizer():
    """A byte-level BPE tokenizer with a few merges (llama.cpp needs merges), ChatML's special tokens and template."""
    return byte_tokenizer(merges=(("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "w"), ("o", "r")))


def family_dir(tmp_path, family, **overrides):
    tokenizer = chat_tokenizer()
    values = dict(vocab_size=VOCAB_SIZE, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, **FAMILIES[family])
    values.update(overrides)
    hf = make_hf_model(family, **values)
    return hf, save_hf_model(hf, tmp_path / family, tokenizer)


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: q/k rows reordered for llama.cpp's RoPE."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def field(reader, key):
    return reader.fields[key].contents() if key in reader.fields else None


def tensors_by_name(reader):
    return {t.name: t for t in reader.tensors}


def file_array(hf_name, weight, config, family="llama"):
    """The float32 array convert_hf_to_gguf would store for a Hugging Face tensor."""
    array = weight.detach().float().numpy()
    if family == "llama" and "q_proj" in hf_name:
        array = llama_cpp_permute(array, config.num_attention_heads)
    if family == "llama" and "k_proj" in hf_name:
        array = llama_cpp_permute(array, config.num_key_value_heads)
    return array


def gguf_names(hf_model, family):
    """llama.cpp's names for a Hugging Face model's tensors, from gguf-py's own mapping."""
    tensor_map = gguf.get_tensor_name_map(GGUF_ARCH[family], hf_model.config.num_hidden_layers)
    names = {name: tensor_map.get_name(name, try_suffixes=(".weight", ".bias")) for name in hf_model.state_dict()}
    if hf_model.config.tie_word_embeddings:
        names.pop("lm_head.weight")
    return names


# ---------------------------------------------------------------- the weights


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_export_reads_back_exactly(tmp_path, family):
    hf, src = family_dir(tmp_path, family)
    out = convert(src, tmp_path / "model.gguf", gguf_type="f32")
    lm, source = load_pretrained(out, dtype="float32"), load_pretrained(src, dtype="float32")
    exported, original = lm.model.state_dict(), source.model.state_dict()
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[name], original[name]) for name in original)
    ids = torch.randint(0, 265, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (lm.model(ids) - hf(ids).logits).abs().max().item() <= 1e-5
    assert lm.config.architecture == ("llama" if family == "mistral" else family)
    assert (lm.config.head_dim, lm.config.tie_word_embeddings) == \
        (source.config.head_dim, source.config.tie_word_embeddings)


@pytest.mark.parametrize("family,file_type,dtype", [("llama", "f16", torch.float16), ("qwen3", "bf16", torch.bfloat16)])
def test_f16_and_bf16_hold_the_rounded_weights(tmp_path, family, file_type, dtype):
    hf, src = family_dir(tmp_path, family)
    lm = load_pretrained(convert(src, tmp_path / "model.gguf", gguf_type=file_type), dtype="float32")
    exported = lm.model.state_dict()
    for name, weight in hf.state_dict().items():
        expected = weight if weight.dim() == 1 else weight.to(dtype).float()  # vectors stay float32
        assert torch.equal(exported[name], expected), name


@pytest.mark.parametrize("file_type", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_quantized_files_hold_exactly_the_gguf_blocks(tmp_path, family, file_type):
    hf, src = family_dir(tmp_path, family)
    out = convert(src, tmp_path / "model.gguf", gguf_type=file_type)
    tensors = tensors_by_name(GGUFReader(out))
    wide = GGMLQuantizationType.Q8_0  # the embedding and output of a 4-bit file, as llama-quantize keeps them wider
    for hf_name, gguf_name in gguf_names(hf, family).items():
        weight = hf.state_dict()[hf_name]
        if weight.dim() == 1:
            assert tensors[gguf_name].tensor_type == GGMLQuantizationType.F32
            continue
        qtype = wide if gguf_name in ("token_embd.weight", "output.weight") else GGMLQuantizationType[file_type.upper()]
        blocks = gguf.quants.quantize(file_array(hf_name, weight, hf.config, family), qtype)
        assert tensors[gguf_name].tensor_type == qtype, gguf_name
        assert np.array_equal(np.asarray(tensors[gguf_name].data), blocks), gguf_name
    exported = load_pretrained(out, dtype="float32").model.state_dict()
    for name, weight in hf.state_dict().items():  # blocks are per row: the q/k row order does not change them
        if weight.dim() == 2:
            qtype = wide if name in ("model.embed_tokens.weight", "lm_head.weight") \
                else GGMLQuantizationType[file_type.upper()]
            weight = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weight.numpy(), qtype), qtype))
        assert torch.equal(exported[name], weight), name


def test_rows_that_do_not_fill_blocks_are_stored_as_f16(tmp_path):
    hf, src = family_dir(tmp_path, "llama", intermediate_size=48)  # ffn_down's rows have 48 values, not 32k
    tensors = tensors_by_name(GGUFReader(convert(src, tmp_path / "model.gguf", gguf_type="q8_0")))
    assert tensors["blk.0.ffn_down.weight"].tensor_type == GGMLQuantizationType.F16
    assert tensors["blk.0.ffn_up.weight"].tensor_type == GGMLQuantizationType.Q8_0


def test_llama_biases_are_permuted_and_named_as_llama_cpp_does(tmp_path):
    hf, src = family_dir(tmp_path, "llama", attention_bias=True, mlp_bias=True)
    reader = GGUFReader(convert(src, tmp_path / "model.gguf", gguf_type="f32"))
    tensors = tensors_by_name(reader)
    names = gguf_names(hf, "llama")
    assert set(tensors) == set(names.values()) and "blk.1.attn_output.bias" in tensors
    for hf_name, gguf_name in names.items():
        expected = file_array(hf_name, hf.state_dict()[hf_name], hf.config)
        assert np.array_equal(np.asarray(tensors[gguf_name].data).reshape(expected.shape), expected), gguf_name


def test_rope_scaling_is_written_as_llama_cpp_reads_it(tmp_path):
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    config = ModelConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=128, rope_theta=500000.0, rope_scaling=scaling)
    state = Transformer(config).state_dict()
    reader = GGUFReader(gguf_format.save_gguf(state, config, tmp_path / "llama3.gguf", "f32"))
    # convert_hf_to_gguf's Llama 3 rope factors: 1 for short wavelengths, `factor` for long, smoothed between.
    expected = []
    for i in range(0, config.head_dim, 2):
        wavelength = 2 * math.pi * config.rope_theta ** (i / config.head_dim)
        smooth = (64 / wavelength - 1.0) / (4.0 - 1.0)
        expected.append(1.0 if wavelength < 64 / 4.0 else 8.0 if wavelength > 64 / 1.0 else
                        1 / ((1 - smooth) / 8.0 + smooth))
    rope_freqs = tensors_by_name(reader)["rope_freqs.weight"]
    assert rope_freqs.tensor_type == GGMLQuantizationType.F32 and len(set(expected)) == 3
    np.testing.assert_allclose(np.asarray(rope_freqs.data), expected, rtol=1e-6)

    linear = config.replace(rope_scaling=dict(rope_type="linear", factor=4.0))
    reader = GGUFReader(gguf_format.save_gguf(state, linear, tmp_path / "linear.gguf", "f32"))
    assert field(reader, "llama.rope.scaling.type") == "linear" and field(reader, "llama.rope.scaling.factor") == 4.0
    assert "rope_freqs.weight" not in tensors_by_name(reader)


# ---------------------------------------------------------------- the metadata and the vocabulary


def test_llama_metadata_is_what_llama_cpp_needs(tmp_path):
    hf, src = family_dir(tmp_path, "llama")
    tokenizer = chat_tokenizer()
    reader = GGUFReader(convert(src, tmp_path / "model.gguf"))  # f16, convert_hf_to_gguf's default
    c = hf.config
    uint32 = {
        "general.file_type": LlamaFileType.MOSTLY_F16,
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        "llama.block_count": c.num_hidden_layers,
        "llama.context_length": c.max_position_embeddings,
        "llama.embedding_length": c.hidden_size,
        "llama.feed_forward_length": c.intermediate_size,
        "llama.attention.head_count": c.num_attention_heads,
        "llama.attention.head_count_kv": c.num_key_value_heads,
        "llama.attention.key_length": c.head_dim,
        "llama.attention.value_length": c.head_dim,
        "llama.rope.dimension_count": c.head_dim,
        "llama.vocab_size": VOCAB_SIZE,
        "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
        "tokenizer.ggml.padding_token_id": tokenizer.pad_token_id,
    }
    float32 = {"llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": c.rms_norm_eps}
    strings = {"general.architecture": "llama", "general.type": "model", "general.name": "model",
               "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.chat_template": CHATML}
    for key, value in uint32.items():
        assert (reader.fields[key].types, field(reader, key)) == ([GGUFValueType.UINT32], value), key
    for key, value in float32.items():
        assert reader.fields[key].types == [GGUFValueType.FLOAT32] and field(reader, key) == pytest.approx(value), key
    for key, value in strings.items():
        assert field(reader, key) == value, key

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    assert field(reader, "tokenizer.ggml.tokens") == \
        [by_id.get(i, f"[PAD{i}]") for i in range(VOCAB_SIZE)]
    specials = {tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|im_start|>")}
    assert field(reader, "tokenizer.ggml.token_type") == \
        [TokenType.CONTROL if i in specials else TokenType.NORMAL if i in by_id else TokenType.UNUSED
         for i in range(VOCAB_SIZE)]
    assert field(reader, "tokenizer.ggml.merges") == ["Ġ t", "h e", "Ġt he", "i n", "Ġ w", "o r"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_tensor_names_and_types_are_llama_cpps(tmp_path, family):
    hf, src = family_dir(tmp_path, family)
    reader = GGUFReader(convert(src, tmp_path / "model.gguf", gguf_type="f16"))
    assert field(reader, "general.architecture") == gguf.MODEL_ARCH_NAMES[GGUF_ARCH[family]]
    names = gguf_names(hf, family)
    tensors = tensors_by_name(reader)
    assert set(tensors) == set(names.values())
    for hf_name, gguf_name in names.items():
        vector = hf.state_dict()[hf_name].dim() == 1
        assert tensors[gguf_name].tensor_type == (GGMLQuantizationType.F32 if vector else GGMLQuantizationType.F16)
    head_dim = field(reader, f"{family}.attention.key_length")
    assert head_dim == (32 if family == "qwen3" else 16 if family == "llama" else None)  # Qwen2's config has none


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_chat_template_and_special_tokens_survive(tmp_path, family):
    _, src = family_dir(tmp_path, family)
    source = chat_tokenizer()
    tokenizer = load_pretrained(convert(src, tmp_path / "model.gguf", gguf_type="q8_0"), dtype="float32").tokenizer
    for generation_prompt in (False, True):
        assert tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation_prompt) == \
            source.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation_prompt)
    chat = source.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    for text in (chat, "the winter in Wörthersee", "<|im_start|>user\n<|endoftext|>"):
        assert tokenizer(text)["input_ids"] == source(text)["input_ids"], text
    for kind in ("bos", "eos", "pad"):
        assert getattr(tokenizer, f"{kind}_token_id") == getattr(source, f"{kind}_token_id"), kind


def sentencepiece_dir(tmp_path):
    """A tiny Llama whose tokenizer is a sentencepiece BPE model with byte fallback, like Llama 2's (trained here in
    milliseconds), loaded from its tokenizer.model."""
    import io
    import json

    import sentencepiece

    model = io.BytesIO()
    text = ["The quick brown fox jumps over the lazy dog.", "Hello world, the winter in Wörthersee is cold.",
            "Numbers 12345 and symbols !?"] * 20
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=320,
                                             model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                             unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=3)
    directory = tmp_path / "sentencepiece"
    make_hf_model("llama", vocab_size=328, bos_token_id=1, eos_token_id=2, pad_token_id=None).save_pretrained(directory)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer",
                                                                 "add_bos_token": True}))
    return directory, sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def test_a_sentencepiece_vocabulary_is_written_from_its_model_file(tmp_path):
    src, pieces = sentencepiece_dir(tmp_path)
    out = convert(src, tmp_path / "model.gguf")
    reader = GGUFReader(out)
    assert (field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre")) == ("llama", "default")
    assert field(reader, "tokenizer.ggml.tokens") == \
        [pieces.id_to_piece(i) for i in range(320)] + [f"[PAD{i}]" for i in range(320, 328)]
    assert field(reader, "tokenizer.ggml.scores") == [pieces.get_score(i) for i in range(320)] + [-10000.0] * 8
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[:4] == [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, TokenType.BYTE]
    assert types[259:] == [TokenType.NORMAL] * 61 + [TokenType.UNUSED] * 8
    assert field(reader, "tokenizer.ggml.add_bos_token") is True and "tokenizer.ggml.merges" not in reader.fields
    source, back = load_pretrained(src).tokenizer, load_pretrained(out, dtype="float32").tokenizer
    for text in ("Hello world, the quick fox.", "Wörthersee 12345 ünïcödé 你好"):
        assert back(text)["input_ids"] == source(text)["input_ids"], text


def test_a_sentencepiece_tokenizer_json_without_its_model_file(tmp_path):
    src, pieces = sentencepiece_dir(tmp_path)
    resaved = tmp_path / "resaved"  # transformers saves tokenizer.json alone
    load_pretrained(src).tokenizer.save_pretrained(resaved)
    for name in ("config.json", "model.safetensors"):
        (resaved / name).write_bytes((src / name).read_bytes())
    reader = GGUFReader(convert(resaved, tmp_path / "model.gguf"))
    assert field(reader, "tokenizer.ggml.model") == "llama"  # gguf's LlamaHfVocab, as convert_hf_to_gguf uses it
    assert field(reader, "tokenizer.ggml.tokens")[:320] == [pieces.id_to_piece(i) for i in range(320)]


@pytest.mark.real
def test_real_model_exported_as_q8_0(real_gguf, real_lm, tmp_path):
    out = gguf_format.save_gguf(real_lm.model.state_dict(), real_lm.config, tmp_path / "smollm2-q8_0.gguf", "q8_0",
                                real_lm.tokenizer)
    original, exported = GGUFReader(real_gguf), GGUFReader(out)
    assert field(exported, "tokenizer.ggml.pre") == "smollm"
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
                "llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "llama.rope.dimension_count"):
        assert field(exported, key) == field(original, key), key
    assert field(exported, "general.file_type") == LlamaFileType.MOSTLY_Q8_0
    assert {t.name: t.tensor_type.name for t in exported.tensors} == \
        {t.name: "F32" if len(t.shape) == 1 else "Q8_0" for t in original.tensors}

    # The weights read back without transformers' vocabulary conversion (seconds on 49152 tokens).
    config = gguf_format.gguf_config(exported, str(out))
    state = gguf_format.gguf_state_dict(exported, config, expected_shapes(config), torch.float32, str(out))
    model = model_from_state_dict(config, state, "cpu")
    ids = real_lm.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected, got = real_lm.model(ids), model(ids)
    # Q8_0 of the Q4_1 weights moves the logits (about ±30) by 0.15 on average and by 0.65 at most; the greedy
    # next token (" Paris") is the same.
    assert (got - expected).abs().max().item() < 2.0 and (got - expected).abs().mean().item() < 0.5
    assert got[0, -1].argmax() == expected[0, -1].argmax()


# ---------------------------------------------------------------- bad input


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_cli_writes_a_gguf_of_the_type_asked(capsys, tmp_path):
    _, src = family_dir(tmp_path, "llama")
    code, out, _ = run(capsys, "convert", src, tmp_path / "model.gguf", "--type", "q4_1")
    assert code == 0 and f"wrote {tmp_path / 'model.gguf'}" in out
    assert field(GGUFReader(tmp_path / "model.gguf"), "general.file_type") == LlamaFileType.MOSTLY_Q4_1
    code, _, _ = run(capsys, "convert", src, tmp_path / "named", "--to", "gguf", "--type", "bf16")
    assert code == 0 and field(GGUFReader(tmp_path / "named"), "general.file_type") == LlamaFileType.MOSTLY_BF16


@pytest.mark.parametrize("options,message", [
    (["--type", "q5_k"], "--type: unknown GGUF file type 'q5_k'; choose one of f32, f16, bf16, q8_0, q4_0, q4_1"),
    (["--tp", "2"], "--tp: Megatron options, but the output is a GGUF file"),
    (["--to", "hf"], "--to hf: writes a directory, but OUT"),
    (["--shard_size", "1GB"], "--shard_size: a GGUF file is written whole"),
])
def test_bad_gguf_options_are_refused_before_anything_is_written(capsys, tmp_path, options, message):
    _, src = family_dir(tmp_path, "llama")
    code, _, err = run(capsys, "convert", src, tmp_path / "model.gguf", *options)
    assert code == 2 and message in err, err
    assert not (tmp_path / "model.gguf").exists()


def test_type_with_a_directory_output_is_refused(capsys, tmp_path):
    _, src = family_dir(tmp_path, "llama")
    code, _, err = run(capsys, "convert", src, tmp_path / "out", "--type", "q8_0")
    assert code == 2 and "--type: a GGUF file type, but the output is a directory (--to hf)" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="--type: unknown GGUF file type 'int4'"):
        convert(src, tmp_path / "model.gguf", gguf_type="int4")


def test_an_existing_file_needs_force(capsys, tmp_path):
    _, src = family_dir(tmp_path, "llama")
    out = tmp_path / "model.gguf"
    out.write_bytes(b"an older file")
    code, _, err = run(capsys, "convert", src, out)
    assert code == 2 and f"{out}: already exists; pass --force to replace it" in err
    assert out.read_bytes() == b"an older file"
    assert run(capsys, "convert", src, out, "--force")[0] == 0 and field(GGUFReader(out), "general.file_type") == \
        LlamaFileType.MOSTLY_F16


def test_a_model_llama_cpp_cannot_run_is_refused(tmp_path):
    config = ModelConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=128, qk_norm=True)
    with pytest.raises(CheckpointError, match="cannot be written as a GGUF llama: only Qwen3 has q/k norms"):
        gguf_format.save_gguf(Transformer(config).state_dict(), config, tmp_path / "model.gguf", "f32")
    bert = config.replace(architecture="bert")
    with pytest.raises(CheckpointError, match="a bert model cannot be written as GGUF"):
        gguf_format.check_gguf_exportable(bert)
    assert os.listdir(tmp_path) == []


def test_a_failure_while_writing_leaves_no_file(tmp_path, monkeypatch):
    _, src = family_dir(tmp_path, "llama")
    out = tmp_path / "model.gguf"
    quantize = gguf.quants.quantize
    calls = []

    def fail_on_the_fifth_tensor(data, qtype):
        calls.append(qtype)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return quantize(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", fail_on_the_fifth_tensor)
    with pytest.raises(OSError, match="No space left"):
        convert(src, out, gguf_type="q8_0")
    assert not out.exists() and not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    out.write_bytes(b"the previous version")
    calls.clear()
    with pytest.raises(OSError, match="No space left"):
        convert(src, out, gguf_type="q8_0", force=True)
    assert out.read_bytes() == b"the previous version"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
