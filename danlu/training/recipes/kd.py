"""Knowledge distillation (`--stage kd`): a student learns from a frozen teacher on another stage's data.

The data and the hard-label loss are those of `kd_stage` (sft: chat answers; pt: text blocks); the method
(`kd_method`: kd, pkd_skip, pkd_last, distilbert, tinybert) says which losses of danlu.distillation are added;
`kd_lmbda` makes some answers the student's own (on-policy, kd_on_policy.py);
dynabert trains one network at several widths and depths (kd_dynabert.py). An encoder teacher (BERT-family)
takes its data and prediction layer from `kd_task` instead (embedding or classification: kd_encoder.py).
The student is `model_name_or_path`, or, with `student_layers N`, N evenly spaced blocks cut from it (then the
teacher defaults to model_name_or_path itself).
"""
from __future__ import annotations

import copy
import dataclasses
from functools import partial
from typing import Optional

import torch
from torch import nn

from danlu.data.supervised import IGNORE_INDEX
from danlu.distillation.layer_map import evenly_spaced_layers, parse_layer_map
from danlu.distillation.objective import (METHOD_WEIGHTS, PROJECTIONS, Objective, Outputs, build_projections,
                                          causal_pairs,
                                          distillation_loss, method_objective, run_model)
from danlu.distillation.students import student_from_teacher
from danlu.training.arguments import ArgumentError
from danlu.training.losses import causal_lm_loss, next_token_labels
from danlu.training.recipes.kd_encoder import build_encoder_stage
from danlu.training.recipes.kd_on_policy import STUDENT_ANSWERS, OnPolicyAnswers, collate_marking_student_answers
from danlu.training.reference import load_frozen
from danlu.training.stage import Stage, StepOutput
from danlu.utils.progress import logger


def build_stage(lm, args) -> Stage:
    from danlu.training.recipes import RECIPES

    teacher = build_teacher(lm, args)
    if args.student_layers:
        layers = evenly_spaced_layers(args.student_layers, teacher.config.num_hidden_layers)
        logger.info("student: %d of the teacher's %d blocks (%s)", len(layers), teacher.config.num_hidden_layers,
                    layers)
        lm.model = student_from_teacher(lm.model, layers)
        lm.config = lm.model.config
    check_compatible(lm.model, teacher)
    objective = dataclasses.replace(
        objective_from_arguments(args, lm.config.num_hidden_layers, teacher.config.num_hidden_layers),
        normalize_states=teacher.config.norm_position == "pre")
    logger.info("distillation: %s, %s", args.kd_method, objective)
    if not teacher.config.causal:  # an encoder teacher: kd_task's data and prediction layer (kd_encoder.py)
        return build_encoder_stage(lm, teacher, objective, args)
    if args.kd_task != "embedding":
        raise ArgumentError(f"kd_task {args.kd_task} is for an encoder teacher; a decoder learns kd_stage's task")
    projections = build_projections(objective, lm.config.hidden_size, teacher.config.hidden_size)
    trained = ()
    if projections is not None:
        setattr(lm.model, PROJECTIONS, projections.to(next(lm.model.parameters()).device))
        trained = (PROJECTIONS,)
    data = RECIPES[args.kd_stage](lm, args)
    if args.kd_method == "dynabert":
        from danlu.training.recipes.kd_dynabert import build_dynabert_stage  # it builds on decoder_step below

        return build_dynabert_stage(lm, teacher, objective, args, data)
    step = partial(kd_step, teacher=teacher, objective=objective)
    if args.kd_lmbda:
        logger.info("on-policy: the student answers %.0f%% of the micro-batches itself", 100 * args.kd_lmbda)
        return Stage(data.train, data.eval, partial(collate_marking_student_answers, collate=data.collate), step,
                     trained_modules=trained, dropped_modules=trained,
                     updates=OnPolicyAnswers(lm.tokenizer, args.generation_config(), args.kd_lmbda, args.seed))
    return Stage(data.train, data.eval, data.collate, step, trained_modules=trained, dropped_modules=trained)


def build_teacher(lm, args) -> nn.Module:
    device = next(lm.model.parameters()).device
    if args.teacher_model:
        logger.info("teacher: %s", args.teacher_model)
        return load_frozen(args.teacher_model, args.names("teacher_adapters"), None, device)
    logger.info("teacher: %s itself (frozen copy)", lm.source)
    return copy.deepcopy(lm.model).eval().requires_grad_(False)


def check_compatible(student: nn.Module, teacher: nn.Module) -> None:
    if student.config.causal != teacher.config.causal:
        kinds = {True: "a decoder", False: "an encoder"}
        raise ArgumentError(f"the teacher is {kinds[teacher.config.causal]} and the student "
                            f"{kinds[student.config.causal]}; distillation needs two of one kind")
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ArgumentError(f"teacher_model: the teacher's vocabulary has {teacher.config.vocab_size} tokens and "
                            f"the student's {student.config.vocab_size}; distilling logits needs one tokenizer")


def objective_from_arguments(args, student_layers: int, teacher_layers: int) -> Objective:
    weights = {key: getattr(args, key) for key in METHOD_WEIGHTS[args.kd_method]}
    layer_map = parse_layer_map(args.layer_map, student_layers, teacher_layers) if args.layer_map else None
    try:
        return method_objective(args.kd_method, weights, student_layers, teacher_layers, args.kd_temperature,
                                args.kd_divergence, args.kd_jsd_beta, layer_map)
    except ValueError as e:
        raise ArgumentError(str(e)) from e


def kd_step(model, batch: dict, teacher: nn.Module, objective: Objective) -> StepOutput:
    on_policy = bool(batch.get(STUDENT_ANSWERS))
    if on_policy:  # no reference answer for the hard-label loss (kd_on_policy.py)
        objective = dataclasses.replace(objective, hard=0.0)
    with torch.no_grad():
        teacher_out = run_model(teacher, batch, objective)
    out = decoder_step(model, batch, teacher_out, objective, getattr(model, PROJECTIONS, None))
    if STUDENT_ANSWERS not in batch:
        return out
    return out._replace(metrics={**out.metrics, "on_policy": float(on_policy)})


def decoder_step(student: nn.Module, batch: dict, teacher_out: Outputs, objective: Objective,
                 projections: Optional[nn.Module] = None) -> StepOutput:
    """The student's forward pass and the objective against the teacher's outputs on the same batch: the soft
    terms where a next token is labelled, the hidden-state terms on every real token."""
    student_out = run_model(student, batch, objective)
    hard, labelled = causal_lm_loss(student_out.logits, batch["labels"])
    tokens = batch["attention_mask"] if batch.get("document_ids") is None else batch["document_ids"] != 0
    pairs = causal_pairs(tokens, batch.get("document_ids")) if objective.attention else None
    predicted = next_token_labels(batch["labels"]) != IGNORE_INDEX
    loss, metrics = distillation_loss(objective, student_out, teacher_out, hard, predicted, tokens, pairs,
                                      projections)
    return StepOutput(loss, int(batch["attention_mask"].sum()), {**metrics, "lm_loss": float(hard.detach())},
                      weight=labelled)
