"""Distillation on the real SmolLM2-135M-Instruct: a 15-block student cut from it learns from it."""
import pytest
import torch

from danlu.checkpoints.bundled import danlu_home
from danlu.checkpoints.load import load_pretrained
from danlu.data.pretrain import prepare_pretrain_data
from danlu.distillation.layer_map import evenly_spaced_layers
from danlu.distillation.students import student_from_teacher
from danlu.evaluation.perplexity import perplexity
from danlu.training.arguments import TrainArguments
from danlu.training.train import train

pytestmark = pytest.mark.real


def held_out_ids(tokenizer) -> list[int]:
    _, held_out = prepare_pretrain_data(tokenizer, "data", ["danlu_text"], 128, danlu_home() / "token-cache",
                                        val_size=0.1)
    return [t for i in range(len(held_out)) for t in held_out[i].input_ids]


def test_a_student_cut_from_smollm2_recovers_with_kd_and_loads_in_transformers(real_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher = load_pretrained(real_gguf, dtype="float32", device="cpu")
    ids = held_out_ids(teacher.tokenizer)
    cut = student_from_teacher(teacher.model, evenly_spaced_layers(15, 30))
    before = perplexity(cut, ids, 128).perplexity
    out = tmp_path / "student"
    train(TrainArguments(model_name_or_path=str(real_gguf), stage="kd", kd_stage="pt", dataset="danlu_text",
                         student_layers=15, finetuning_type="full", kd_method="kd", learning_rate=1e-4,
                         lr_scheduler_type="constant", max_steps=6, per_device_train_batch_size=2, cutoff_len=128,
                         val_size=0.1, logging_steps=3, save_steps=100, output_dir=str(out)))
    student = load_pretrained(out, dtype="float32", device="cpu").model
    after = perplexity(student, ids, 128).perplexity
    assert student.config.num_hidden_layers == 15
    assert after < before / 10, (before, after)  # the cut student is broken; six steps of KD repair much of it
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    sample = torch.tensor([ids[:32]])
    with torch.no_grad():
        torch.testing.assert_close(hf(sample).logits, student(sample), atol=1e-4, rtol=1e-4)
