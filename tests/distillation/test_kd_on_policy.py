"""On-policy KD (`--kd_lmbda`, GKD): the student's own answers to the prompts, scored by the teacher."""
import dataclasses
import json
from functools import partial

import pytest
import torch

from danlu.checkpoints.load import load_pretrained
from danlu.data.collate import collate
from danlu.data.supervised import IGNORE_INDEX, Tokenized
from danlu.distillation.objective import method_objective, run_model
from danlu.generation.generate import generate
from danlu.generation.sampling import GenerationConfig
from danlu.training.arguments import ArgumentError, TrainArguments
from danlu.training.recipes.kd import decoder_step, kd_step
from danlu.training.recipes.kd_on_policy import (STUDENT_ANSWERS, OnPolicyAnswers, StudentAnswer,
                                                 collate_marking_student_answers)
from danlu.training.train import train
from tests.conftest import byte_tokenizer, make_hf_model, save_hf_model

GREEDY = GenerationConfig(max_new_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = byte_tokenizer()
    model = make_hf_model("llama", vocab_size=len(tokenizer), num_hidden_layers=2, pad_token_id=tokenizer.pad_token_id)
    return save_hf_model(model, tmp_path_factory.mktemp("model"), tokenizer)


def chat_examples() -> list[Tokenized]:
    """Two conversations: a prompt (unlabelled) then an answer (labelled)."""
    rows = [([5, 6, 7, 8], [40, 41, 42]), ([9, 10, 11], [50, 51, 52, 53])]
    return [Tokenized(p + a, [IGNORE_INDEX] * len(p) + a) for p, a in rows]


def test_the_students_answers_replace_the_reference_answers_of_the_same_prompts(model_dir):
    lm = load_pretrained(model_dir, dtype="float32")
    lm.model.train()
    examples = chat_examples()
    [[answered]] = list(OnPolicyAnswers(lm.tokenizer, GREEDY, 1.0, seed=0)(lm.model, [examples]))
    expected = generate(lm.model, lm.tokenizer, [[5, 6, 7, 8], [9, 10, 11]], GREEDY, keep_eos=True)
    assert lm.model.training  # generation ran in eval mode and the mode was given back
    for example, completion, prompt in zip(answered, expected, ([5, 6, 7, 8], [9, 10, 11])):
        assert isinstance(example, StudentAnswer)
        assert example.input_ids == prompt + completion.token_ids
        assert example.labels == [IGNORE_INDEX] * len(prompt) + completion.token_ids
        assert completion.token_ids  # something was generated and is learned


def test_the_share_of_on_policy_batches_follows_lmbda_and_the_seed_alone(model_dir):
    batches = [[Tokenized([i, i + 1, 7], [IGNORE_INDEX, IGNORE_INDEX, 7])] for i in range(400)]
    choose = OnPolicyAnswers(None, GREEDY, 0.3, seed=5).on_policy
    chosen = [choose(batch) for batch in batches]
    assert 0.22 < sum(chosen) / len(chosen) < 0.38
    assert chosen == [OnPolicyAnswers(None, GREEDY, 0.3, seed=5).on_policy(b) for b in batches]  # same on resume
    assert chosen != [OnPolicyAnswers(None, GREEDY, 0.3, seed=6).on_policy(b) for b in batches]
    assert not any(OnPolicyAnswers(None, GREEDY, 0.0, seed=5).on_policy(b) for b in batches)
    assert all(OnPolicyAnswers(None, GREEDY, 1.0, seed=5).on_policy(b) for b in batches)


def test_a_batch_of_student_answers_is_trained_on_the_kd_terms_without_the_hard_loss(model_dir):
    student = load_pretrained(model_dir, dtype="float32").model.train()
    torch.manual_seed(0)
    teacher = load_pretrained(model_dir, dtype="float32").model.eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # a teacher that disagrees with the student
    objective = method_objective("kd", {}, 2, 2)
    examples = [StudentAnswer(e.input_ids, e.labels) for e in chat_examples()]
    flagged = collate_marking_student_answers(examples, partial(collate, pad_id=0))
    assert flagged[STUDENT_ANSWERS] is True
    plain = collate(examples, pad_id=0)
    assert collate_marking_student_answers(chat_examples(), partial(collate, pad_id=0))[STUDENT_ANSWERS] is False

    out = kd_step(student, flagged, teacher, objective)
    with torch.no_grad():
        teacher_out = run_model(teacher, plain, objective)
    soft_only = decoder_step(student, plain, teacher_out, dataclasses.replace(objective, hard=0.0))
    with_hard = decoder_step(student, plain, teacher_out, objective)
    torch.testing.assert_close(out.loss, soft_only.loss)
    assert not torch.isclose(out.loss, with_hard.loss)
    assert out.metrics["on_policy"] == 1.0


def kd_args(model_dir, out, **overrides):
    values = dict(model_name_or_path=str(model_dir), stage="kd", dataset="identity", dataset_dir="data",
                  finetuning_type="full", learning_rate=1e-3, max_steps=3, per_device_train_batch_size=2,
                  logging_steps=1, save_steps=10, cutoff_len=96, output_dir=str(out), seed=7,
                  teacher_model=str(model_dir), max_new_tokens=8)
    values.update(overrides)
    return TrainArguments(**values)


def test_on_policy_training_logs_its_share_and_saves_a_student(model_dir, tmp_path):
    out = tmp_path / "run"
    result = train(kd_args(model_dir, out, kd_lmbda=1.0, kd_divergence="jsd"))
    assert result.state.global_step == 3
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and "on_policy" in r]
    assert len(steps) == 3 and all(r["on_policy"] == 1.0 for r in steps)
    assert all(r["loss"] >= 0 for r in steps)
    assert load_pretrained(out, dtype="float32").model is not None


@pytest.mark.parametrize("overrides, message", [
    (dict(kd_lmbda=1.5), "kd_lmbda .* must be in \\[0, 1\\], got 1.5"),
    (dict(kd_lmbda=0.5, kd_stage="pt"), "kd_lmbda 0.5: on-policy answers .* kd_stage pt"),
    (dict(kd_lmbda=0.5, packing=True), "need kd_stage sft without packing .* packing True"),
    (dict(kd_lmbda=0.5, kd_method="dynabert", teacher_model=None), "a method other than dynabert .* dynabert"),
    (dict(kd_method="dynabert", teacher_model=None, teacher_adapters="a"), "teacher_adapters needs teacher_model"),
])
def test_on_policy_settings_that_cannot_work_are_refused(model_dir, tmp_path, overrides, message):
    with pytest.raises(ArgumentError, match=message):
        kd_args(model_dir, tmp_path / "x", **overrides).validate()
