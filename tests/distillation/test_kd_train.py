"""`train(--stage kd)` end to end on tiny checkpoints with a byte tokenizer: the student that comes out is a
plain Hugging Face model (projections dropped) that transformers loads."""
import json

import pytest
import torch

from danlu.checkpoints.load import load_pretrained
from danlu.training.arguments import ArgumentError, TrainArguments
from danlu.training.train import train
from tests.conftest import byte_tokenizer, make_hf_model, save_hf_model


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    tokenizer = byte_tokenizer()
    model = make_hf_model("llama", vocab_size=len(tokenizer), num_hidden_layers=4, pad_token_id=tokenizer.pad_token_id)
    return save_hf_model(model, tmp_path_factory.mktemp("teacher"), tokenizer)


def kd_args(model_dir, out, **overrides):
    values = dict(model_name_or_path=str(model_dir), stage="kd", dataset="identity,danlu_instruct",
                  dataset_dir="data", finetuning_type="full", learning_rate=1e-3, max_steps=4,
                  per_device_train_batch_size=4, logging_steps=1, save_steps=2, cutoff_len=96, output_dir=str(out),
                  seed=7)
    values.update(overrides)
    return TrainArguments(**values)


def log_rows(out):
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["kd", "pkd_skip", "distilbert", "tinybert"])
def test_a_student_cut_from_the_teacher_trains_and_loads_in_transformers(teacher_dir, tmp_path, method):
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    result = train(kd_args(teacher_dir, out, student_layers=2, kd_method=method))
    assert result.state.global_step == 4
    assert all(r.get("loss", 0) >= 0 for r in log_rows(out))
    assert any("kd_soft" in r or "kd_hidden" in r for r in log_rows(out))
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.num_hidden_layers == 2
    ours = load_pretrained(out, dtype="float32").model
    ids = torch.randint(3, 200, (1, 12))
    torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_narrower_student_learns_through_projections_that_are_not_saved(teacher_dir, tmp_path):
    from safetensors import safe_open

    tokenizer = byte_tokenizer()
    narrow = make_hf_model("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    student_dir = save_hf_model(narrow, tmp_path / "student", tokenizer)
    out = tmp_path / "run"
    train(kd_args(student_dir, out, teacher_model=str(teacher_dir), kd_method="tinybert", layer_map="1:2,2:4"))
    with safe_open(out / "model.safetensors", "pt") as f:
        names = list(f.keys())
    assert not any("distill" in n for n in names)
    checkpoint = next(out.glob("checkpoint-*"))
    assert any("distill_projections" in n for n in safe_open(checkpoint / "trainable.safetensors", "pt").keys())


def test_a_student_with_another_vocabulary_is_refused(teacher_dir, tmp_path):
    tokenizer = byte_tokenizer()
    other = make_hf_model("llama", vocab_size=len(tokenizer) + 5, pad_token_id=tokenizer.pad_token_id)
    student_dir = save_hf_model(other, tmp_path / "student", tokenizer)
    with pytest.raises(ArgumentError, match="distilling logits needs one tokenizer"):
        train(kd_args(student_dir, tmp_path / "run", teacher_model=str(teacher_dir)))


def test_dynabert_width_then_depth_then_a_smaller_model_transformers_loads(teacher_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from danlu.cli.export import ExportArguments, export_merged
    from danlu.distillation.dynabert import sub_network

    width_run, depth_run = tmp_path / "width", tmp_path / "depth"
    first = train(kd_args(teacher_dir, width_run, kd_method="dynabert", dynabert_widths="1.0,0.5"))
    rows = log_rows(width_run)
    assert any("lm_loss_w0.5_d1" in r for r in rows) and any("lm_loss_w1_d1" in r for r in rows)
    assert first.state.global_step == 4
    second = train(kd_args(width_run, depth_run, teacher_model=str(width_run), kd_method="dynabert",
                           dynabert_widths="1.0,0.5", dynabert_depths="1.0,0.5"))
    assert any("lm_loss_w0.5_d0.5" in r for r in log_rows(depth_run)) and second.state.global_step == 4
    small = tmp_path / "small"
    export_merged(ExportArguments(model_name_or_path=str(depth_run), export_dir=str(small), dynabert_width=0.5,
                                  dynabert_depth=0.5))
    hf = AutoModelForCausalLM.from_pretrained(small).eval()
    assert (hf.config.num_hidden_layers, hf.config.num_attention_heads, hf.config.intermediate_size) == (2, 2, 64)
    full = load_pretrained(depth_run, dtype="float32").model
    ids = torch.randint(3, 200, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, sub_network(full, 0.5, 0.5)(ids), atol=1e-4, rtol=1e-4)


def test_dynabert_multipliers_are_checked():
    with pytest.raises(ArgumentError, match="dynabert_widths: every multiplier must be in \\(0, 1\\] and 1.0"):
        TrainArguments(dataset="identity", stage="kd", kd_method="dynabert", finetuning_type="full",
                       dynabert_widths="0.5,0.25")
    with pytest.raises(ArgumentError, match="dynabert_depths: expected comma-separated numbers"):
        TrainArguments(dataset="identity", stage="kd", kd_method="dynabert", finetuning_type="full",
                       dynabert_depths="1.0;0.5")
    with pytest.raises(ArgumentError, match="kd_method dynabert trains the whole model"):
        TrainArguments(dataset="identity", stage="kd", kd_method="dynabert")


def test_export_refuses_a_dynabert_size_that_keeps_nothing(teacher_dir, tmp_path):
    from danlu.cli.export import ExportArguments, export_merged

    with pytest.raises(ArgumentError, match="dynabert_width / dynabert_depth: width 0.1 keeps none"):
        export_merged(ExportArguments(model_name_or_path=str(teacher_dir), export_dir=str(tmp_path / "out"),
                                      dynabert_width=0.1))
    assert not (tmp_path / "out").exists()
