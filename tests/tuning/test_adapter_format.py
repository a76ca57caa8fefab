"""The PEFT adapter format through its one owner (danlu.checkpoints.adapters) and tuning's save/load."""
import json

import pytest
import torch
from safetensors.torch import load_file

from danlu.checkpoints.adapters import LoRAConfig, PeftAdapter, read_adapter, write_adapter
from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.load import load_pretrained
from danlu.models.presets import get_preset
from danlu.models.transformer import Transformer
from danlu.tuning.lora import apply_lora, load_adapter, lora_state_dict, save_adapter
from tests.conftest import make_hf_model, save_hf_model

IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(get_preset("tiny-llama")).eval()


def train_a_little(model, seed=1):
    """Random adapter and modules_to_save weights, as if trained."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def small_adapter(config) -> PeftAdapter:
    g = torch.Generator().manual_seed(0)
    lora = {}
    for module in ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]:
        lora[f"{module}.lora_A.weight"] = torch.randn(config.rank, 64, generator=g)
        lora[f"{module}.lora_B.weight"] = torch.randn(64 if "q_proj" in module else 32, config.rank, generator=g)
    return PeftAdapter(config, lora, {"model.norm.weight": torch.randn(64, generator=g)}, "org/base-model")


def test_write_then_read_gives_back_the_adapter_and_peft_fields(tmp_path):
    config = LoRAConfig(rank=2, alpha=5.0, dropout=0.1, targets=["v_proj", "q_proj"], modules_to_save=["norm"])
    adapter = small_adapter(config)
    write_adapter(tmp_path / "a", adapter)
    back = read_adapter(tmp_path / "a")
    assert back.config == LoRAConfig(2, 5.0, 0.1, ["q_proj", "v_proj"], ["norm"])
    assert back.base_model == "org/base-model"
    for mine, theirs in [(adapter.lora_state, back.lora_state), (adapter.saved_state, back.saved_state)]:
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert {k: raw[k] for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save",
                                "base_model_name_or_path")} == {
        "peft_type": "LORA", "r": 2, "lora_alpha": 5.0, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": ["norm"], "base_model_name_or_path": "org/base-model"}
    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert "base_model.model.model.norm.weight" in keys  # modules_to_save under the plain name, as PEFT saves them
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 5


def test_save_adapter_writes_the_config_used_and_load_adapter_restores_the_model(tmp_path):
    model = tiny_model()
    config = LoRAConfig(rank=4, alpha=8, dropout=0.05, targets=["all"], modules_to_save=["norm", "lm_head"])
    apply_lora(model, config)
    train_a_little(model)
    save_adapter(model, tmp_path / "a", config, base_model="tiny-llama")
    back = read_adapter(tmp_path / "a")
    assert back.config == LoRAConfig(4, 8, 0.05, PROJECTIONS, ["norm", "lm_head"]) and back.base_model == "tiny-llama"
    assert back.lora_state.keys() == lora_state_dict(model).keys() and len(back.modules()) == 14
    assert sorted(back.saved_state) == sorted(["lm_head.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")])
    with torch.no_grad():
        expected = model(IDS)
        fresh = tiny_model()
        assert not torch.allclose(fresh(IDS), expected, atol=1e-3)
        assert sorted(load_adapter(fresh, tmp_path / "a")) == back.modules()
        assert torch.equal(fresh(IDS), expected)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}  # ready to train on, as saved


def test_modules_to_save_load_in_peft_with_the_same_logits(tmp_path):
    from peft import PeftModel

    hf = make_hf_model("llama")
    lm = load_pretrained(save_hf_model(hf, tmp_path / "base"), dtype="float32")
    config = LoRAConfig(rank=4, alpha=8, targets=["q_proj", "up_proj"], modules_to_save=["norm"])
    apply_lora(lm.model, config)
    train_a_little(lm.model)
    out = save_adapter(lm.model, tmp_path / "adapter", config, base_model=str(tmp_path / "base"))
    peft_model = PeftModel.from_pretrained(hf, str(out)).eval()
    with torch.no_grad():
        assert (peft_model(IDS).logits - lm.model(IDS)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("targets", [["q_proj"], "q_proj", r".*\.q_proj"])
def test_target_modules_may_be_a_list_or_a_string(tmp_path, targets):
    model = tiny_model()
    config = LoRAConfig(rank=2, alpha=4, targets=["q_proj"])
    apply_lora(model, config)
    train_a_little(model)
    save_adapter(model, tmp_path / "a", config)
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    raw["target_modules"] = targets  # a string is PEFT's regular expression; the weights name the modules
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(raw))
    assert read_adapter(tmp_path / "a").config.targets == ([targets] if isinstance(targets, str) else targets)
    fresh = tiny_model()
    assert load_adapter(fresh, tmp_path / "a") == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with torch.no_grad():
        assert torch.equal(fresh(IDS), model(IDS))


def test_the_writer_refuses_an_adapter_its_config_does_not_describe(tmp_path):
    config = LoRAConfig(rank=2, alpha=4, targets=["q_proj", "v_proj"], modules_to_save=["norm"])
    adapter = small_adapter(config)
    for bad, match in [
        (PeftAdapter(LoRAConfig(2, 4, targets=["all"], modules_to_save=["norm"]), adapter.lora_state,
                     adapter.saved_state), "do not name the adapted"),
        (PeftAdapter(LoRAConfig(3, 4, targets=["q_proj", "v_proj"], modules_to_save=["norm"]), adapter.lora_state,
                     adapter.saved_state), "do not fit rank r=3"),
        (PeftAdapter(LoRAConfig(2, 4, targets=["q_proj", "v_proj"]), adapter.lora_state, adapter.saved_state),
         "belong to no module of modules_to_save"),
        (PeftAdapter(config, {k: v for k, v in adapter.lora_state.items() if "lora_B" not in k}),
         "needs both lora_A.weight and lora_B.weight"),
        (PeftAdapter(config, {}), "has no LoRA weights"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            write_adapter(tmp_path / "a", bad)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="no LoRA adapter to save"):
        save_adapter(tiny_model(), tmp_path / "a", config)


def test_the_reader_names_what_it_cannot_use(tmp_path):
    config = LoRAConfig(rank=2, alpha=4, targets=["q_proj", "v_proj"], modules_to_save=["norm"])
    write_adapter(tmp_path / "a", small_adapter(config))
    path = tmp_path / "a" / "adapter_config.json"
    raw = json.loads(path.read_text())
    for change, match in [({"use_dora": True}, "use_dora"), ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
                          ({"r": 3}, "do not fit rank r=3"), ({"target_modules": None}, "missing 'target_modules'")]:
        path.write_text(json.dumps({**raw, **change}))
        with pytest.raises(CheckpointError, match=match):
            read_adapter(tmp_path / "a")
    path.write_text(json.dumps(raw))
    one_layer = get_preset("tiny-llama")
    one_layer.num_hidden_layers = 1
    model = Transformer(one_layer)
    with pytest.raises(CheckpointError, match="'model.layers.1.self_attn.v_proj', which is not a linear layer"):
        load_adapter(model, tmp_path / "a")
    assert not any("lora" in n for n, _ in model.named_parameters())  # nothing was changed
