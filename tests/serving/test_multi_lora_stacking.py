"""Per-request adapters on top of an unmerged --adapter: `danlu api --adapter A --lora b=B` on a tiny model."""
import pytest
import torch

from danlu.checkpoints.load import load_pretrained
from danlu.serving.multi_lora import MultiLoRA, MultiLoRALinear
from danlu.tuning.lora import LoRAConfig, LoRALinear, apply_lora, load_adapter, merge_lora, save_adapter
from danlu.tuning.surgery import base_linears
from tests.conftest import make_hf_model, save_hf_model

IDS = torch.randint(4, 32, (2, 10), generator=torch.Generator().manual_seed(0))
# A and B share q_proj, so there a per-request adapter stacks on a LoRA layer; elsewhere on plain linears.
TARGETS = {"A": ["q_proj", "v_proj", "down_proj"], "B": ["q_proj", "o_proj", "up_proj"]}


def letters_tokenizer():
    """A 32-token tokenizer, one token a character, built here (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *"abcdefghijklmnopqrstuvwxyz", ".", ","])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with a tokenizer, and two trained-looking adapters A and B in PEFT's format."""
    root = tmp_path_factory.mktemp("tiny-multi-lora")
    hf = make_hf_model("llama", vocab_size=32, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base = save_hf_model(hf, root / "base", letters_tokenizer())
    paths = {}
    for seed, (name, targets) in enumerate(TARGETS.items()):
        model = load_pretrained(base, dtype="float32").model
        config = LoRAConfig(rank=4, alpha=8, targets=targets)
        apply_lora(model, config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        paths[name] = save_adapter(model, root / name, config)
    return base, paths


def merged(base, *adapters):
    lm = load_pretrained(base, dtype="float32")
    for adapter in adapters:
        load_adapter(lm.model, adapter)
        merge_lora(lm.model)
    return lm


def test_per_request_adapter_stacks_on_the_unmerged_adapter(tiny):
    base, paths = tiny
    lm = load_pretrained(base, dtype="float32")
    plain = [linear.name for linear in base_linears(lm.model)]
    load_adapter(lm.model, paths["A"])  # as `--adapter A`: unmerged LoRALinear layers
    multi = MultiLoRA.load(lm.model, {"b": str(paths["B"])})
    q = lm.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, MultiLoRALinear) and isinstance(q.base_layer, LoRALinear)
    linears = {linear.name: linear.path for linear in base_linears(lm.model)}
    assert list(linears) == plain  # the base linears, seen through both wrappers
    assert linears["model.layers.0.self_attn.q_proj"] == "model.layers.0.self_attn.q_proj.base_layer.base_layer"
    assert linears["model.layers.0.self_attn.o_proj"] == "model.layers.0.self_attn.o_proj.base_layer"
    with torch.no_grad():
        a, ab = merged(base, paths["A"]).model(IDS), merged(base, paths["A"], paths["B"]).model(IDS)
        assert not torch.allclose(a, ab, atol=1e-3)
        multi.set_rows(["b", None])
        out = lm.model(IDS)
        assert torch.allclose(out[0], ab[0], atol=1e-5) and torch.allclose(out[1], a[1], atol=1e-5)
        multi.set_rows([None, "b"])
        out = lm.model(IDS)
        assert torch.allclose(out[0], a[0], atol=1e-5) and torch.allclose(out[1], ab[1], atol=1e-5)
    with pytest.raises(ValueError, match="'b' is already served"):
        multi.add("b", str(paths["B"]))


def test_api_with_adapter_and_lora_serves_both(tiny):
    from fastapi.testclient import TestClient

    from danlu.cli.api import build_engine_and_app
    from danlu.cli.main import build_parser
    from danlu.generation.generate import generate
    from danlu.generation.sampling import GenerationConfig

    base, paths = tiny
    args = build_parser().parse_args(["api", "--model", str(base), "--dtype", "float32", "--device", "cpu",
                                      "--adapter", str(paths["A"]), "--lora", f"b={paths['B']}"])
    engine, app, name = build_engine_and_app(args)  # crashed here: MultiLoRA met a LoRALinear
    references = {"b": merged(base, paths["A"], paths["B"]), name: merged(base, paths["A"])}
    with torch.no_grad():
        engine.adapters.set_rows(["b", None])
        out = engine.model(IDS)
        assert torch.allclose(out[0], references["b"].model(IDS)[0], atol=1e-5)
        assert torch.allclose(out[1], references[name].model(IDS)[1], atol=1e-5)
    engine.start()
    try:
        client = TestClient(app)
        for model, reference in references.items():
            r = client.post("/v1/completions", json={"model": model, "prompt": "abc", "max_tokens": 6,
                                                     "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            ids = reference.tokenizer("abc", add_special_tokens=True)["input_ids"]
            with torch.no_grad():
                expected = generate(reference.model, reference.tokenizer, [ids],
                                    GenerationConfig(max_new_tokens=6, temperature=0), eos_ids=[])[0]
            assert r.json()["choices"][0]["text"] == expected.text
    finally:
        engine.stop()
