"""GGUF import: a tiny GGUF written the way llama.cpp writes it, the real Q4_1 file, and bad files."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.load import load_pretrained
from danlu.cli.convert import convert
from tests.conftest import make_hf_model


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf.py reorders q/k rows for its RoPE; the reader must undo it.
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, hf, arch="llama"):
    import gguf

    c = hf.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(c.vocab_size)
    if arch == "qwen3":  # llama.cpp writes Qwen3's head_dim (128, not hidden / heads) as the key length
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight",
             "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp writes no output matrix for a tied head
        array = tensor.numpy().astype(np.float32)
        if name in names:
            target = names[name]
        else:
            parts = name.split(".")
            target = f"blk.{parts[2]}.{layer['.'.join(parts[3:])]}"
        if arch == "llama" and name.endswith("q_proj.weight"):
            array = _llama_cpp_permute(array, c.num_attention_heads)
        if arch == "llama" and name.endswith("k_proj.weight"):
            array = _llama_cpp_permute(array, c.num_key_value_heads)
        writer.add_tensor(target, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path):
    hf = make_hf_model("llama", num_attention_heads=4, num_key_value_heads=2)
    return hf, write_tiny_gguf(tmp_path / "tiny.gguf", hf)


@pytest.fixture
def no_vocabulary(monkeypatch):
    import danlu.checkpoints.load as load_module

    monkeypatch.setattr(load_module.gguf_format, "gguf_tokenizer", lambda *a: None)  # the tiny GGUF has none


def test_tiny_gguf_matches_original_model(tiny_gguf, no_vocabulary, monkeypatch):
    monkeypatch.setenv("DANLU_GGUF_CACHE", "0")
    hf, path = tiny_gguf
    lm = load_pretrained(path, dtype="float32")
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (lm.model(ids) - hf(ids).logits).abs().max().item() <= 1e-5
    assert lm.config.num_key_value_heads == 2 and not lm.config.tie_word_embeddings


def test_tiny_qwen3_gguf_matches_original_model(tmp_path, no_vocabulary, monkeypatch):
    monkeypatch.setenv("DANLU_GGUF_CACHE", "0")
    hf = make_hf_model("qwen3", head_dim=32, tie_word_embeddings=True)
    lm = load_pretrained(write_tiny_gguf(tmp_path / "qwen3.gguf", hf, arch="qwen3"), dtype="float32")
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (lm.model(ids) - hf(ids).logits).abs().max().item() <= 1e-5
    c = lm.config
    assert (c.architecture, c.head_dim, c.qk_norm, c.tie_word_embeddings) == ("qwen3", 32, True, True)


def test_conversion_is_cached_and_a_damaged_cache_is_redone(tiny_gguf, no_vocabulary, monkeypatch, tmp_path):
    from danlu.checkpoints import gguf as gguf_format

    monkeypatch.setenv("DANLU_HOME", str(tmp_path / "home"))
    hf, path = tiny_gguf
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    first = load_pretrained(path, dtype="float32")
    cached = gguf_format.cache_dir_for(path, tmp_path / "home" / "gguf-cache")
    assert (cached / "config.json").is_file() and (cached / "model.safetensors").is_file()
    opened = []
    monkeypatch.setattr(gguf_format, "open_gguf", lambda p: opened.append(p) or gguf_format.GGUFReader(str(p)))
    second = load_pretrained(path, dtype="float32")
    assert opened == [] and second.source == str(path)
    with torch.no_grad():
        assert torch.equal(first.model(ids), second.model(ids))
    (cached / "model.safetensors").write_bytes(b"broken")
    third = load_pretrained(path, dtype="float32")
    assert len(opened) == 1 and (cached / "model.safetensors").stat().st_size > 100
    with torch.no_grad():
        assert torch.equal(first.model(ids), third.model(ids))


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="model.gguf: not a readable GGUF file"):
        load_pretrained(bad)


def test_truncated_gguf(tiny_gguf, tmp_path):
    _, path = tiny_gguf
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.gguf: not a readable GGUF file"):
        load_pretrained(cut)


def test_unsupported_gguf_architecture(tmp_path):
    import gguf

    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'falcon'"):
        load_pretrained(path)


@pytest.mark.real
def test_real_gguf_logits_match_transformers(real_lm, hf_real, real_tokenizer):
    ids = real_tokenizer("The quick brown fox jumps over the lazy dog. 你好，世界！", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (real_lm.model(ids) - hf_real(ids).logits).abs().max().item() <= 1e-4
    assert real_lm.config.num_hidden_layers == 30 and real_lm.config.tie_word_embeddings


@pytest.mark.real
def test_real_gguf_converts_to_hf_that_transformers_loads(real_gguf, hf_real, real_tokenizer, tmp_path):
    out = convert(real_gguf, tmp_path / "smollm2-hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == \
        real_tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer("Converting GGUF to Hugging Face", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (model(ids).logits - hf_real(ids).logits).abs().max().item() <= 1e-4
