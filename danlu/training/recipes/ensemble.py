"""Ensemble-compression's local step (`--parallel local=K --aggregate ensemble`): a stage's data, and a loss that
distils the local model towards the workers' ensemble as of the last aggregation (the kd loss: (1 - kd_alpha)
labels + kd_alpha T^2 soft cross-entropy with the ensemble's distribution), the compression folded into local
training as the MSRA article suggests. Before the first aggregation the stage's own step trains on the labels.
"""
from __future__ import annotations

from functools import partial

import torch

from danlu.distillation.objective import METHOD_WEIGHTS, Objective, method_objective, run_model
from danlu.distributed.aggregation import Ensemble
from danlu.training.recipes.kd import decoder_step
from danlu.training.stage import Stage, StepOutput


def ensemble_objective(args, layers: int) -> Objective:
    weights = {key: getattr(args, key) for key in METHOD_WEIGHTS["kd"]}
    return method_objective("kd", weights, layers, layers, args.kd_temperature, args.kd_divergence,
                            args.kd_jsd_beta)


def ensemble_compression_stage(stage: Stage, ensemble: Ensemble, objective: Objective) -> Stage:
    step = partial(ensemble_compression_step, own_step=stage.step, ensemble=ensemble, objective=objective)
    return Stage(stage.train, stage.eval, stage.collate, step, stage.trained_modules, stage.dropped_modules)


def ensemble_compression_step(model, batch: dict, own_step, ensemble: Ensemble, objective: Objective) -> StepOutput:
    if not ensemble.members:
        return own_step(model, batch)
    with torch.no_grad():
        teacher_out = run_model(ensemble, batch, objective)
    return decoder_step(model, batch, teacher_out, objective)
