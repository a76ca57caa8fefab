"""A distillation method as weights on the losses of losses.py, and the loss of one batch.

    loss = soft * T^2 * divergence(student logits, teacher logits)     (Hinton; T^2 keeps the gradients' scale)
         + hard * the task's own loss on the labels                      (next-token cross-entropy)
         + cosine * (1 - cos) of the last hidden states                  (DistilBERT)
         + hidden * sum over mapped layers of the layer loss             (Patient-KD: normalized_mse; TinyBERT: mse)
         + attention * sum over mapped layers of the attention-score MSE (TinyBERT)
         + embedding * MSE of the embedding outputs                      (TinyBERT)

An encoder (danlu/training/recipes/kd_encoder.py) changes where two terms look: its soft term compares its task's
prediction (class logits; or, with `soft_loss` "mse", the sentence embeddings: soft * MSE(student embedding,
teacher embedding), no T, replacing the logit divergence as in sentence-transformers' distillation, Reimers &
Gurevych 2020), and Patient-KD compares the [CLS] vectors (`pkd_position` 0, TextBrewer's pkd_loss).

A student narrower than its teacher is projected to the teacher's width by a learned linear map (TinyBERT's
W_h and W_e) before the hidden-state losses; the projections train with the student and are dropped after.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from danlu.distillation import losses
from danlu.distillation.layer_map import LayerMap, pkd_last_map, pkd_skip_map, uniform_map
from danlu.models.transformer import Intermediates

METHODS = ("kd", "pkd_skip", "pkd_last", "distilbert", "tinybert", "dynabert")
# Each method's own weights and their published defaults (the keys are danlu train's arguments).
METHOD_WEIGHTS = {
    "kd": {"kd_alpha": 0.5},
    "pkd_skip": {"kd_alpha": 0.5, "kd_beta": 100.0},
    "pkd_last": {"kd_alpha": 0.5, "kd_beta": 100.0},
    "distilbert": {"kd_ce_weight": 5.0, "kd_lm_weight": 2.0, "kd_cos_weight": 1.0},
    "tinybert": {"kd_attention_weight": 1.0, "kd_hidden_weight": 1.0, "kd_embedding_weight": 1.0,
                 "kd_prediction_weight": 1.0},
    "dynabert": {"kd_prediction_weight": 1.0, "kd_hidden_weight": 1.0},  # lambda_1, lambda_2
}
DEFAULT_TEMPERATURE = {"kd": 2.0, "pkd_skip": 2.0, "pkd_last": 2.0, "distilbert": 2.0, "tinybert": 1.0,
                       "dynabert": 1.0}
PROJECTIONS = "distill_projections"  # where the projections ride on the student while it trains


@dataclass(frozen=True)
class Objective:
    soft: float = 0.0
    hard: float = 0.0
    cosine: float = 0.0
    hidden: float = 0.0
    attention: float = 0.0
    embedding: float = 0.0
    hidden_loss: str = "mse"  # or "normalized_mse" (Patient-KD)
    layer_map: LayerMap = ()
    temperature: float = 1.0
    divergence: str = "ce"
    jsd_beta: float = 0.5
    # Pre-norm models (every decoder here) carry an unnormalised residual stream whose scale grows with depth
    # (SmolLM2's reaches hundreds): their hidden-state MSEs compare RMS-normalised states, so that no layer's
    # scale swamps the other terms. Post-norm states (BERT) are compared as they are, as in the papers.
    normalize_states: bool = False
    soft_loss: str = "divergence"  # or "mse": the MSE of the predictions themselves (sentence embeddings; no T)
    pkd_position: Optional[int] = None  # Patient-KD's vectors: None every counted token, 0 an encoder's [CLS]

    @property
    def uses_hidden_states(self) -> bool:
        return bool(self.cosine or self.hidden or self.embedding)


def method_objective(method: str, weights: dict[str, Optional[float]], student_layers: int, teacher_layers: int,
                     temperature: Optional[float] = None, divergence: str = "ce", jsd_beta: float = 0.5,
                     layer_map: Optional[LayerMap] = None) -> Objective:
    """The Objective of a method; `weights` holds the user's values for the method's keys (None: the default)."""
    if method not in METHOD_WEIGHTS:
        raise ValueError(f"kd_method must be one of {', '.join(METHODS)}; got {method!r}")
    check_layer_map(method, layer_map)
    w = {key: default if weights.get(key) is None else weights[key] for key, default in METHOD_WEIGHTS[method].items()}
    common = dict(temperature=DEFAULT_TEMPERATURE[method] if temperature is None else temperature,
                  divergence=divergence, jsd_beta=jsd_beta)
    if method == "kd":
        return Objective(soft=w["kd_alpha"], hard=1.0 - w["kd_alpha"], **common)
    if method in ("pkd_skip", "pkd_last"):
        default_map = (pkd_skip_map if method == "pkd_skip" else pkd_last_map)(student_layers, teacher_layers)
        return Objective(soft=w["kd_alpha"], hard=1.0 - w["kd_alpha"], hidden=w["kd_beta"],
                         hidden_loss="normalized_mse", layer_map=layer_map or default_map, **common)
    if method == "distilbert":
        return Objective(soft=w["kd_ce_weight"], hard=w["kd_lm_weight"], cosine=w["kd_cos_weight"], **common)
    if method == "dynabert":  # l_pred + (l_emb + l_hidn) between a sub-network and its teacher, layer by layer
        return Objective(soft=w["kd_prediction_weight"], hidden=w["kd_hidden_weight"],
                         embedding=w["kd_hidden_weight"],
                         layer_map=layer_map or uniform_map(student_layers, teacher_layers), **common)
    return Objective(soft=w["kd_prediction_weight"], hidden=w["kd_hidden_weight"],
                     attention=w["kd_attention_weight"], embedding=w["kd_embedding_weight"],
                     layer_map=layer_map or uniform_map(student_layers, teacher_layers), **common)


def check_layer_map(method: str, layer_map: Optional[LayerMap]) -> None:
    """ValueError for a layer map the method would not use as given: kd and distilbert pair no layers, DynaBERT
    pairs each sub-network's kept layers itself, Patient-KD pairs hidden layers (not the embeddings, 0)."""
    if not layer_map:
        return
    if method in ("kd", "distilbert", "dynabert"):
        why = "pairs each sub-network's kept layers itself" if method == "dynabert" else "has no layer terms"
        raise ValueError(f"layer_map applies to kd_method pkd_skip, pkd_last or tinybert; {method} {why}")
    if method in ("pkd_skip", "pkd_last") and any(0 in pair for pair in layer_map):
        raise ValueError(f"layer_map: Patient-KD pairs hidden layers (1 and up); 0, the embeddings, is not one: "
                         f"{','.join(f'{s}:{t}' for s, t in layer_map)}")


def build_projections(objective: Objective, student_width: int, teacher_width: int) -> Optional[nn.ModuleDict]:
    """TinyBERT's W_h (hidden states) and W_e (embeddings) when the widths differ; None when they match."""
    if student_width == teacher_width or not objective.uses_hidden_states:
        return None
    if objective.cosine:
        raise ValueError(f"DistilBERT's cosine loss compares hidden states of one width; the student is "
                         f"{student_width} wide and the teacher {teacher_width}")
    return nn.ModuleDict({"hidden": nn.Linear(student_width, teacher_width),
                          "embedding": nn.Linear(student_width, teacher_width)})


@dataclass
class Outputs:
    """One model's forward pass over a batch: logits and what it recorded on the way."""

    logits: torch.Tensor
    seen: Intermediates


def run_model(model: nn.Module, batch: dict, objective: Objective) -> Outputs:
    seen = Intermediates(attention_scores=objective.attention > 0)
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], document_ids=batch.get("document_ids"),
                   intermediates=seen)
    return Outputs(logits, seen)


def distillation_loss(objective: Objective, student: Outputs, teacher: Outputs, hard_loss: torch.Tensor,
                      predicted: torch.Tensor, tokens: torch.Tensor, pairs: Optional[torch.Tensor],
                      projections: Optional[nn.ModuleDict] = None) -> tuple[torch.Tensor, dict]:
    """The weighted sum for one batch, and each term (unweighted) as a metric.

    predicted [batch, seq]: the positions whose prediction is scored (the soft loss compares the logits there);
    tokens [batch, seq]: the real tokens (hidden-state losses); pairs [batch, 1, q, k]: the (query, key) pairs
    attention may use (attention-score loss)."""
    terms: dict[str, torch.Tensor] = {}
    if objective.hard:
        terms["hard"] = hard_loss
    if objective.soft and objective.soft_loss == "mse":
        terms["soft"] = losses.hidden_mse(student.logits, teacher.logits.detach(), predicted)
    elif objective.soft:
        terms["soft"] = losses.divergence(
            objective.divergence, student.logits, teacher.logits.detach(), objective.temperature, predicted,
            objective.jsd_beta)
    s_states, t_states = student.seen.hidden_states, teacher.seen.hidden_states
    if objective.cosine:
        terms["cosine"] = losses.cosine_loss(s_states[-1], t_states[-1].detach(), tokens)
    if objective.embedding:
        terms["embedding"] = layer_loss(objective, project(projections, "embedding", s_states[0]),
                                        t_states[0].detach(), tokens)
    if objective.hidden:
        terms["hidden"] = sum(layer_loss(objective, project(projections, "hidden", s_states[s]),
                                         t_states[t].detach(), tokens)
                              for s, t in objective.layer_map if s > 0)
    if objective.attention:
        terms["attention"] = sum(losses.attention_mse(student.seen.scores[s - 1], teacher.seen.scores[t - 1].detach(),
                                                      pairs)
                                 for s, t in objective.layer_map if s > 0)
    soft_scale = objective.temperature ** 2 if objective.soft_loss == "divergence" else 1.0
    weight = {"hard": objective.hard, "soft": objective.soft * soft_scale, "cosine": objective.cosine,
              "embedding": objective.embedding, "hidden": objective.hidden, "attention": objective.attention}
    loss = sum(weight[name] * value for name, value in terms.items())
    return loss, {f"kd_{name}": float(value.detach()) for name, value in terms.items() if name != "hard"}


def causal_pairs(tokens: torch.Tensor, document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[batch, 1, seq, seq]: the (query, key) pairs a decoder's attention scores mean something for: a real query,
    a real key at or before it, in the same document of a packed row."""
    seq = tokens.shape[1]
    pairs = torch.ones(seq, seq, dtype=torch.bool, device=tokens.device).tril()[None]
    if document_ids is not None:
        pairs = pairs & (document_ids[:, :, None] == document_ids[:, None, :])
    real = tokens.bool()
    return (pairs & real[:, :, None] & real[:, None, :])[:, None]


def encoder_pairs(tokens: torch.Tensor) -> torch.Tensor:
    """[batch, 1, seq, seq]: an encoder's (query, key) pairs that mean something: a real query and a real key,
    either way round (TextBrewer's att_mse_loss mask, mask_q x mask_k)."""
    real = tokens.bool()
    return (real[:, :, None] & real[:, None, :])[:, None]


def project(projections: Optional[nn.ModuleDict], which: str, states: torch.Tensor) -> torch.Tensor:
    return states if projections is None else projections[which](states)


def layer_loss(objective: Objective, student_states, teacher_states, tokens) -> torch.Tensor:
    if objective.hidden_loss == "normalized_mse" and objective.pkd_position is not None:
        return losses.normalized_mse(student_states[:, objective.pkd_position],
                                     teacher_states[:, objective.pkd_position])
    if objective.hidden_loss == "normalized_mse":
        keep = tokens.bool()
        return losses.normalized_mse(student_states[keep], teacher_states[keep])
    if objective.normalize_states:
        student_states, teacher_states = rms_normalized(student_states), rms_normalized(teacher_states)
    return losses.hidden_mse(student_states, teacher_states, tokens)


def rms_normalized(states: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(states.float(), states.shape[-1:], eps=1e-6)
