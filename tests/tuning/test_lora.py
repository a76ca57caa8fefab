"""LoRA: the LoRA article's parameter counts, PEFT file-format parity, merging and export."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.load import load_pretrained
from danlu.cli.export import ExportArguments, export_merged
from danlu.models.presets import get_preset
from danlu.models.transformer import build_meta_model
from danlu.models.roles import COLUMN, ROW, modules_with_role
from danlu.models.transformer import Transformer
from danlu.tuning.lora import (LoRAConfig, LoRALinear, adapters_disabled, apply_lora, count_trainable, load_adapter,
                               merge_lora, resolve_targets, save_adapter)
from tests.conftest import make_hf_model, save_hf_model

IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
CONFIG = LoRAConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])


@pytest.mark.parametrize("targets,expected", [(["q_proj", "v_proj"], 4_194_304), (["all", "lm_head"], 20_277_248)])
def test_trainable_counts_of_the_lora_article_on_llama2_7b(targets, expected):
    model = build_meta_model(get_preset("llama-2-7b"))
    apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=targets))
    assert count_trainable(model)[0] == expected


def test_all_excludes_head_and_unknown_target_is_named():
    model = build_meta_model(get_preset("tiny-llama"))
    names = resolve_targets(model, ["all"])
    assert len(names) == 2 * 7 and not any(n.endswith("lm_head") for n in names)
    with pytest.raises(ValueError, match="lora_target 'qkv' matches no linear layer"):
        resolve_targets(model, ["qkv"])


def _trained_lora(tmp_path, family="llama"):
    hf = make_hf_model(family)
    directory = save_hf_model(hf, tmp_path / "base")
    lm = load_pretrained(directory, dtype="float32")
    with torch.no_grad():
        before = lm.model(IDS)
    apply_lora(lm.model, CONFIG)
    with torch.no_grad():
        assert torch.equal(lm.model(IDS), before)  # B = 0: the model starts unchanged
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # as if trained
    return hf, directory, lm


def test_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    from peft import PeftModel

    hf, _, lm = _trained_lora(tmp_path)
    out = save_adapter(lm.model, tmp_path / "adapter", CONFIG)
    peft_model = PeftModel.from_pretrained(hf, str(out)).eval()
    with torch.no_grad():
        assert (peft_model(IDS).logits - lm.model(IDS)).abs().max().item() <= 1e-5


def test_merge_equals_unmerged_and_adapter_round_trips(tmp_path):
    _, directory, lm = _trained_lora(tmp_path, "qwen2")
    save_adapter(lm.model, tmp_path / "adapter", CONFIG)
    with torch.no_grad():
        unmerged = lm.model(IDS)
        fresh = load_pretrained(directory, dtype="float32")
        load_adapter(fresh.model, tmp_path / "adapter")
        assert (fresh.model(IDS) - unmerged).abs().max().item() <= 1e-6
        merge_lora(fresh.model)
        assert (fresh.model(IDS) - unmerged).abs().max().item() <= 1e-5
        assert not any("lora" in n for n, _ in fresh.model.named_parameters())


def test_export_merges_several_adapters_with_scales(tmp_path):
    from peft import PeftModel

    hf, directory, lm = _trained_lora(tmp_path)
    save_adapter(lm.model, tmp_path / "a1", CONFIG)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_adapter(lm.model, tmp_path / "a2", CONFIG)
    out = export_merged(ExportArguments(model_name_or_path=str(directory),
                                        adapter_name_or_path=f"{tmp_path / 'a1'},{tmp_path / 'a2'}",
                                        adapter_scales="1.0,0.5", export_dir=str(tmp_path / "merged")))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    # The same sum by hand through PEFT: a1 at scale 1, merged, then a2 with its alpha halved.
    reference = PeftModel.from_pretrained(hf, str(tmp_path / "a1")).merge_and_unload()
    config = json.loads((tmp_path / "a2" / "adapter_config.json").read_text())
    config["lora_alpha"] = config["lora_alpha"] * 0.5
    (tmp_path / "a2" / "adapter_config.json").write_text(json.dumps(config))
    reference = PeftModel.from_pretrained(reference, str(tmp_path / "a2")).merge_and_unload().eval()
    with torch.no_grad():
        assert (merged(IDS).logits - reference(IDS).logits).abs().max().item() <= 1e-4
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_adapter_errors(tmp_path):
    model = build_meta_model(get_preset("tiny-llama"))
    with pytest.raises(CheckpointError, match="adapter_config.json: not found"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(CheckpointError, match="PREFIX_TUNING"):
        load_adapter(model, tmp_path)


def test_unmerge_restores_the_base_weight():
    base = torch.nn.Linear(8, 6)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, rank=2, alpha=4)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 8)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert torch.allclose(layer(x), unmerged, atol=1e-5) and not torch.equal(base.weight, original)
        layer.unmerge()
        assert torch.allclose(base.weight, original, atol=1e-6) and torch.allclose(layer(x), unmerged, atol=1e-5)


def tiny_model():
    torch.manual_seed(0)
    return Transformer(get_preset("tiny-llama")).eval()


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)  # as if trained


def test_all_is_the_column_and_row_linears_of_the_roles_table():
    model = tiny_model()
    assert resolve_targets(model, ["all"]) == modules_with_role(model, COLUMN, ROW)
    full = "model.layers.1.self_attn.o_proj"
    assert resolve_targets(model, [full, "up_proj"]) == ["model.layers.0.mlp.up_proj", full,
                                                         "model.layers.1.mlp.up_proj"]
    with pytest.raises(ValueError, match=r"choose from \['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj'"):
        resolve_targets(model, ["embed_tokens"])  # not a linear
    with pytest.raises(ValueError, match="'all' matches no linear layer with a column or row role"):
        resolve_targets(torch.nn.Sequential(torch.nn.Linear(4, 4)), ["all"])


def test_modules_to_save_train_beside_the_adapters():
    model = tiny_model()
    names = apply_lora(model, LoRAConfig(rank=2, alpha=4, targets=["q_proj"], modules_to_save=["lm_head", "norm"]))
    assert len(names) == 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {n for n in dict(model.named_parameters()) if n.endswith("norm.weight")}  # PEFT's rule: names ending
    assert len(norms) == 5 and trainable == {"lm_head.weight", *norms} | {
        f"model.layers.{i}.self_attn.q_proj.lora_{p}.weight" for i in range(2) for p in "AB"}
    with pytest.raises(ValueError, match=r"modules_to_save \['nothing'\] match no module"):
        apply_lora(tiny_model(), LoRAConfig(targets=["q_proj"], modules_to_save=["nothing"]))
    with pytest.raises(ValueError, match="both adapted by LoRA and saved whole"):
        apply_lora(tiny_model(), LoRAConfig(targets=["q_proj"], modules_to_save=["self_attn"]))


def test_lora_config_is_validated_and_one_class():
    from danlu.checkpoints.adapters import LoRAConfig as FormatConfig

    assert LoRAConfig is FormatConfig
    config = LoRAConfig(targets="q_proj, v_proj", modules_to_save=[])
    assert config.targets == ["q_proj", "v_proj"] and config.modules_to_save is None
    for bad, match in [(dict(rank=0), "rank must be a positive integer"), (dict(dropout=1.0), "dropout"),
                       (dict(targets=[]), "at least one module"), (dict(targets=["q_proj", ""]), "targets")]:
        with pytest.raises(ValueError, match=match):
            LoRAConfig(**bad)


def test_stacked_adapters_merge_innermost_first():
    model = tiny_model()
    apply_lora(model, LoRAConfig(rank=2, alpha=4, targets=["q_proj", "up_proj"]))
    randomize_adapters(model, 1)
    apply_lora(model, LoRAConfig(rank=3, alpha=3, targets=["q_proj"]))  # a second adapter over the first
    randomize_adapters(model, 2)
    with torch.no_grad():
        unmerged = model(IDS)
        merge_lora(model)
        assert torch.allclose(model(IDS), unmerged, atol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_disabled_layer_gives_the_base_output_merged_or_not():
    base = torch.nn.Linear(8, 6)
    layer = LoRALinear(base, rank=2, alpha=4)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 8)
    with torch.no_grad():
        plain, adapted = base(x), layer(x)
        layer.disabled = True
        assert torch.equal(layer(x), plain)
        layer.merge()
        assert torch.allclose(layer(x), plain, atol=1e-5)  # the folded-in update is taken back out
        layer.disabled = False
        assert torch.allclose(layer(x), adapted, atol=1e-5)


def test_adapters_disabled_runs_the_base_model_and_restores_the_switches():
    model = tiny_model()
    with torch.no_grad():
        base = model(IDS)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    randomize_adapters(model)
    one = model.model.layers[1].mlp.down_proj
    one.disabled = True  # switched off before: stays off after
    with torch.no_grad():
        adapted = model(IDS)
        with adapters_disabled(model) as same:
            assert same is model and torch.equal(model(IDS), base)
        assert torch.equal(model(IDS), adapted) and one.disabled
        assert not torch.allclose(adapted, base, atol=1e-3)
    with pytest.raises(RuntimeError, match="inside"):
        with adapters_disabled(model):
            raise RuntimeError("inside")
    switches = [m.disabled for m in model.modules() if isinstance(m, LoRALinear)]
    assert switches.count(True) == 1 and len(switches) == 14
    one.disabled = False
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    with adapters_disabled(model):  # the reference pass of DPO: the adapters take no part in it
        reference = model(IDS)
    assert not reference.requires_grad  # the base is frozen: no graph is kept for the reference
    loss = (model(IDS) - reference.detach()).pow(2).mean()  # and after it, the adapters train
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)
