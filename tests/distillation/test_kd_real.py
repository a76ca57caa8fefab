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


def test_on_policy_kd_on_smollm2_brings_the_student_closer_to_the_teacher_on_its_own_answers(real_gguf, tmp_path):
    import json
    from functools import partial

    from danlu.data.collate import collate
    from danlu.data.supervised import IGNORE_INDEX
    from danlu.distillation.objective import method_objective
    from danlu.generation.generate import generate
    from danlu.generation.sampling import GenerationConfig
    from danlu.training.recipes.kd import kd_step
    from danlu.training.recipes.kd_on_policy import StudentAnswer, collate_marking_student_answers

    teacher = load_pretrained(real_gguf, dtype="float32", device="cpu")
    cut = student_from_teacher(teacher.model, evenly_spaced_layers(20, 30)).eval()
    texts = [teacher.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                   tokenize=False)
             for q in ("Who are you?", "What is distillation?", "Name a colour.")]
    prompts = [teacher.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    answers = generate(cut, teacher.tokenizer, prompts, GenerationConfig(max_new_tokens=16, temperature=0.0),
                       keep_eos=True)
    batch = collate_marking_student_answers(
        [StudentAnswer(p + a.token_ids, [IGNORE_INDEX] * len(p) + a.token_ids) for p, a in zip(prompts, answers)],
        partial(collate, pad_id=0))
    objective = method_objective("kd", {"kd_alpha": 1.0}, 20, 30, divergence="jsd")

    def divergence(student) -> float:
        with torch.no_grad():
            return float(kd_step(student.eval(), batch, teacher.model, objective).loss)

    before = divergence(cut)
    out = tmp_path / "student"
    train(TrainArguments(model_name_or_path=str(real_gguf), stage="kd", dataset="identity", student_layers=20,
                         finetuning_type="full", kd_method="kd", kd_alpha=1.0, kd_divergence="jsd", kd_lmbda=1.0,
                         max_new_tokens=16, learning_rate=1e-4, lr_scheduler_type="constant", max_steps=4,
                         per_device_train_batch_size=2, cutoff_len=128, logging_steps=1, save_steps=100,
                         output_dir=str(out)))
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["on_policy"] for r in rows if "on_policy" in r] == [1.0] * 4
    after = divergence(load_pretrained(out, dtype="float32", device="cpu").model)
    print(f"\non-policy KD, 20 of 30 blocks: JSD on the cut student's own answers {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before  # measured 1.61 -> 1.37
