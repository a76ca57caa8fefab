"""The kd stage on tiny random models: students cut from the teacher, the papers' layer maps, each method's
objective, a step that is zero for a perfect student, and training that brings the student to its teacher."""
import copy
import random

import pytest
import torch

from danlu.data.collate import collate
from danlu.data.supervised import IGNORE_INDEX, Tokenized
from danlu.distillation.layer_map import (evenly_spaced_layers, parse_layer_map, pkd_last_map, pkd_skip_map,
                                          uniform_map)
from danlu.distillation.objective import PROJECTIONS, build_projections, causal_pairs, method_objective
from danlu.distillation.students import student_from_teacher
from danlu.models.presets import get_preset
from danlu.models.transformer import Intermediates, Transformer
from danlu.training.arguments import ArgumentError, TrainArguments
from danlu.training.loop import FitConfig, fit
from danlu.training.optim import build_optimizer
from danlu.training.recipes.kd import kd_step
from danlu.training.schedule import build_scheduler
from danlu.training.stage import Stage


def tiny_teacher(layers=4, hidden=64, seed=0):
    torch.manual_seed(seed)
    config = get_preset("tiny-llama").replace(num_hidden_layers=layers, hidden_size=hidden)
    model = Transformer(config)
    model.init_weights()
    return model.eval().requires_grad_(False)


def examples(n=12, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = [rng.randrange(3, 256) for _ in range(rng.randrange(2, 5))]
        answer = [rng.randrange(3, 256) for _ in range(rng.randrange(3, 7))]
        rows.append(Tokenized(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return rows


# ------------------------------------------------------------------ layer maps (the papers' examples)

def test_distilbert_takes_every_other_layer_and_tinybert_maps_to_the_end_of_each_stretch():
    assert evenly_spaced_layers(6, 12) == [0, 2, 4, 6, 8, 10]
    assert evenly_spaced_layers(15, 30) == list(range(0, 30, 2))
    assert uniform_map(4, 12) == ((1, 3), (2, 6), (3, 9), (4, 12))  # g(m) = m N / M


def test_patient_kd_maps_are_the_papers_sets():
    assert [t for _, t in pkd_skip_map(6, 12)] == [2, 4, 6, 8, 10]
    assert [t for _, t in pkd_last_map(6, 12)] == [7, 8, 9, 10, 11]
    assert [s for s, _ in pkd_last_map(6, 12)] == [1, 2, 3, 4, 5]


def test_a_layer_map_is_read_and_checked():
    assert parse_layer_map("1:2, 2:4,0:0", 2, 4) == ((1, 2), (2, 4), (0, 0))
    with pytest.raises(ValueError, match="student:teacher pairs.*'1-2'"):
        parse_layer_map("1-2", 2, 4)
    with pytest.raises(ValueError, match="'3:2' is out of range: the student has layers 0..2"):
        parse_layer_map("3:2", 2, 4)
    with pytest.raises(ValueError, match="student_layers must be between 1 and the teacher's 4"):
        evenly_spaced_layers(5, 4)


@pytest.mark.parametrize("method, layer_map, message", [
    ("kd", ((1, 2),), "layer_map applies to kd_method pkd_skip, pkd_last or tinybert; kd has no layer terms"),
    ("distilbert", ((1, 2),), "distilbert has no layer terms"),
    ("dynabert", ((1, 2),), "dynabert pairs each sub-network's kept layers itself"),
    ("pkd_skip", ((0, 0), (1, 2)), "Patient-KD pairs hidden layers \\(1 and up\\); 0, the embeddings, is not one: 0:0,1:2"),
])
def test_a_layer_map_the_method_would_not_use_is_refused(method, layer_map, message):
    with pytest.raises(ValueError, match=message):
        method_objective(method, {}, 2, 4, layer_map=layer_map)
    assert method_objective("tinybert", {}, 2, 4, layer_map=((0, 0), (1, 2))).layer_map == ((0, 0), (1, 2))


# ------------------------------------------------------------------ students

def test_a_student_of_all_layers_is_the_teacher():
    teacher = tiny_teacher()
    student = student_from_teacher(teacher, [0, 1, 2, 3])
    ids = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(student(ids), teacher(ids))


def test_a_student_holds_copies_of_the_chosen_blocks():
    teacher = tiny_teacher()
    student = student_from_teacher(teacher, [0, 2])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
    assert student.model.layers[1].self_attn.layer_idx == 1  # its own KV cache slot
    student.model.layers[1].mlp.up_proj.weight.data.zero_()
    assert teacher.model.layers[2].mlp.up_proj.weight.abs().sum() > 0  # a copy, not a view
    # by hand: the teacher's embedding, blocks 0 and 2, its norm and head
    ids = torch.randint(0, 256, (1, 6))
    seen = Intermediates()
    teacher_layers = teacher.model.layers
    x = teacher.model.embed_tokens(ids)
    student_fresh = student_from_teacher(teacher, [0, 2])
    student_fresh(ids, intermediates=seen)
    torch.testing.assert_close(seen.hidden_states[0], x)
    with pytest.raises(ValueError, match="increasing block indices"):
        student_from_teacher(teacher, [2, 0])
    assert len(teacher_layers) == 4


# ------------------------------------------------------------------ objectives

def test_each_method_has_its_papers_weights():
    kd = method_objective("kd", {}, 2, 4)
    assert (kd.soft, kd.hard, kd.temperature) == (0.5, 0.5, 2.0)
    pkd = method_objective("pkd_skip", {"kd_alpha": 0.7, "kd_beta": 10.0}, 2, 4)
    assert (pkd.soft, round(pkd.hard, 6), pkd.hidden, pkd.hidden_loss, pkd.layer_map) == (0.7, 0.3, 10.0, "normalized_mse",
                                                                               ((1, 2),))
    distilbert = method_objective("distilbert", {}, 2, 4)
    assert (distilbert.soft, distilbert.hard, distilbert.cosine, distilbert.temperature) == (5.0, 2.0, 1.0, 2.0)
    tinybert = method_objective("tinybert", {"kd_prediction_weight": 0.0}, 2, 4)
    assert (tinybert.soft, tinybert.attention, tinybert.hidden, tinybert.embedding) == (0.0, 1.0, 1.0, 1.0)
    assert tinybert.layer_map == ((1, 2), (2, 4)) and tinybert.temperature == 1.0


def test_a_weight_of_another_method_and_bad_values_are_refused():
    base = dict(dataset="identity", stage="kd", student_layers=2, finetuning_type="full")
    with pytest.raises(ArgumentError, match="kd_cos_weight applies to kd_method distilbert, not kd"):
        TrainArguments(**base, kd_cos_weight=1.0)
    with pytest.raises(ArgumentError, match="kd_alpha must be in \\[0, 1\\]"):
        TrainArguments(**base, kd_alpha=1.5)
    with pytest.raises(ArgumentError, match="kd_method must be one of kd, pkd_skip"):
        TrainArguments(**base, kd_method="minilm")
    with pytest.raises(ArgumentError, match="stage kd needs a teacher"):
        TrainArguments(dataset="identity", stage="kd")
    with pytest.raises(ArgumentError, match="student_layers makes a new, smaller model.*finetuning_type full"):
        TrainArguments(dataset="identity", stage="kd", student_layers=2)


# ------------------------------------------------------------------ the step

@pytest.mark.parametrize("method", ["kd", "pkd_skip", "pkd_last", "distilbert", "tinybert"])
def test_a_student_equal_to_its_teacher_has_nothing_to_learn(method):
    teacher = tiny_teacher()
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    objective = method_objective(method, {"kd_alpha": 1.0} if method in ("kd", "pkd_skip", "pkd_last") else {},
                                 4, 4, divergence="forward_kl")
    batch = collate(examples(4), pad_id=0)
    out = kd_step(student, batch, teacher, objective)
    hard = out.metrics["lm_loss"]
    expected = {"kd": 0.0, "pkd_skip": 0.0, "pkd_last": None, "distilbert": 2.0 * hard, "tinybert": 0.0}[method]
    if expected is not None:
        assert abs(float(out.loss.detach()) - expected) < 1e-4
    for name, value in out.metrics.items():
        if name in ("kd_soft", "kd_cosine", "kd_attention", "kd_embedding") or (name == "kd_hidden" and method != "pkd_last"):
            assert abs(value) < 1e-4, (name, value)


def test_attention_pairs_are_causal_real_and_within_one_document():
    tokens = torch.tensor([[1, 1, 1, 0]])
    pairs = causal_pairs(tokens)[0, 0]
    assert pairs.tolist() == [[True, False, False, False], [True, True, False, False],
                              [True, True, True, False], [False, False, False, False]]
    packed = causal_pairs(torch.tensor([[1, 1, 1, 1]]), torch.tensor([[1, 1, 2, 2]]))[0, 0]
    assert not packed[2, 1] and packed[3, 2] and packed[1, 0]


def fit_student(student, teacher, objective, out, steps=30, lr=3e-3):
    data = examples(16)
    stage = Stage(data, data[:4], lambda rows: collate(rows, pad_id=0),
                  lambda model, batch: kd_step(model, batch, teacher, objective))
    optimizer = build_optimizer(student, "adamw_torch", lr, 0.0, (0.9, 0.999), 1e-8, 0.9)
    scheduler = build_scheduler(optimizer, "constant", 0, steps)
    return fit(student, stage, optimizer, scheduler, FitConfig(out, max_steps=steps, batch_size=4, logging_steps=1,
                                                              save_steps=1000))


@pytest.mark.parametrize("method", ["kd", "pkd_skip", "tinybert"])
def test_training_brings_a_cut_student_towards_its_teacher(method, tmp_path):
    teacher = tiny_teacher()
    student = student_from_teacher(teacher, [0, 2]).train().requires_grad_(True)
    objective = method_objective(method, {"kd_alpha": 1.0} if method != "tinybert" else {}, 2, 4,
                                 divergence="forward_kl")
    batch = collate(examples(16), pad_id=0)
    before = kd_step(student, batch, teacher, objective)
    result = fit_student(student, teacher, objective, tmp_path)
    after = kd_step(student, batch, teacher, objective)
    assert result.train_losses[-1] < result.train_losses[0]
    assert float(after.loss.detach()) < 0.7 * float(before.loss.detach())
    assert after.metrics["kd_soft"] < before.metrics["kd_soft"]


def test_a_narrower_student_learns_through_projections_that_train_with_it(tmp_path):
    teacher = tiny_teacher()
    config = teacher.config.replace(num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    torch.manual_seed(1)
    student = Transformer(config)
    student.init_weights()
    objective = method_objective("tinybert", {}, 2, 4)
    projections = build_projections(objective, 32, 64)
    setattr(student, PROJECTIONS, projections)
    W = projections["hidden"].weight.detach().clone()
    fit_student(student.train(), teacher, objective, tmp_path, steps=5)
    assert not torch.equal(projections["hidden"].weight, W)  # W_h learned
    with pytest.raises(ValueError, match="cosine loss compares hidden states of one width"):
        build_projections(method_objective("distilbert", {}, 2, 4), 32, 64)
    assert build_projections(objective, 64, 64) is None


def test_pre_norm_states_are_compared_rms_normalised():
    from danlu.distillation.objective import Objective, layer_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 8), torch.randn(2, 5, 8) * 300  # a decoder's late residual stream
    tokens = torch.ones(2, 5)
    plain, normalised = Objective(hidden=1.0), Objective(hidden=1.0, normalize_states=True)
    assert layer_loss(plain, student, teacher, tokens) > 1e4
    by_hand = ((student / student.pow(2).mean(-1, keepdim=True).sqrt()
                - teacher / teacher.pow(2).mean(-1, keepdim=True).sqrt()) ** 2).mean()
    torch.testing.assert_close(layer_loss(normalised, student, teacher, tokens), by_hand, atol=1e-4, rtol=1e-4)
