"""LoRA: the LoRA article's parameter counts, PEFT file-format parity, merging and export."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from danlu.checkpoints.adapters import save_peft_adapter
from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.load import load_pretrained
from danlu.cli.export import ExportArguments, export_merged
from danlu.models.presets import get_preset
from danlu.models.transformer import build_meta_model
from danlu.tuning.lora import (LoRAConfig, apply_lora, count_trainable, load_adapter, lora_state_dict, merge_lora,
                               resolve_targets)
from tests.conftest import make_hf_model, save_hf_model

IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))


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
    apply_lora(lm.model, LoRAConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        assert torch.equal(lm.model(IDS), before)  # B = 0: the model starts unchanged
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # as if trained
    return hf, directory, lm


def test_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    from peft import PeftModel

    hf, _, lm = _trained_lora(tmp_path)
    out = save_peft_adapter(tmp_path / "adapter", lora_state_dict(lm.model), 4, 8, 0.0,
                            ["q_proj", "v_proj", "down_proj"])
    peft_model = PeftModel.from_pretrained(hf, str(out)).eval()
    with torch.no_grad():
        assert (peft_model(IDS).logits - lm.model(IDS)).abs().max().item() <= 1e-5


def test_merge_equals_unmerged_and_adapter_round_trips(tmp_path):
    _, directory, lm = _trained_lora(tmp_path, "qwen2")
    save_peft_adapter(tmp_path / "adapter", lora_state_dict(lm.model), 4, 8, 0.0, ["q_proj", "v_proj", "down_proj"])
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
    save_peft_adapter(tmp_path / "a1", lora_state_dict(lm.model), 4, 8, 0.0, ["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_peft_adapter(tmp_path / "a2", lora_state_dict(lm.model), 4, 8, 0.0, ["q_proj", "v_proj", "down_proj"])
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
    from danlu.tuning.lora import LoRALinear

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
