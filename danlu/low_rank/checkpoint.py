"""A factorized model on disk: a Hugging Face directory whose config.json says which layers are factorized.

    config.json        the model's Hugging Face config plus "low_rank": {"model.layers.0.self_attn.q_proj": 96, ...}
                       (the factorized layers' names and ranks; transformers keeps an unknown key as a config
                       attribute and builds the plain model, so it cannot load this directory: see --dense)
    model.safetensors  each factorized layer as `<name>.a.weight` [rank, in], `<name>.b.weight` [out, rank] and
                       `<name>.b.bias`; every other tensor as in the plain model

`danlu.checkpoints.load` builds the model's structure, installs a LowRankLinear at each recorded name with its
recorded rank (`install_low_rank`), and then loads the weights strictly, as for any checkpoint. A writer adds the
field with `save_hf_checkpoint(..., extra_config=low_rank_config(model))`.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from danlu.checkpoints.errors import CheckpointError
from danlu.low_rank.linear import LowRankLinear, factorized_layers
from danlu.tuning.surgery import plain_name, replace_module
from danlu.utils.jsonfile import read_json

FIELD = "low_rank"


def low_rank_ranks(model: nn.Module) -> dict[str, int]:
    """{plain name: rank} of the model's factorized layers, in module order (empty for a plain model)."""
    return {plain_name(name): layer.rank for name, layer in factorized_layers(model).items()}


def low_rank_config(model: nn.Module) -> dict:
    """The config.json key a factorized model needs to be loaded again ({} for a plain model)."""
    ranks = low_rank_ranks(model)
    return {FIELD: ranks} if ranks else {}


def read_low_rank(directory) -> dict[str, int]:
    """The factorized layers a Hugging Face directory records ({} when config.json has no low_rank field)."""
    path = Path(directory) / "config.json"
    ranks = read_json(path, CheckpointError).get(FIELD) or {}
    if not isinstance(ranks, dict) or not all(isinstance(name, str) and type(rank) is int and rank >= 1
                                              for name, rank in ranks.items()):
        raise CheckpointError(f"{path}: {FIELD!r} must map layer names to ranks (whole numbers of at least 1), "
                              f"got {ranks!r}")
    return ranks


def install_low_rank(model: nn.Module, ranks: dict[str, int], where: str = "config.json's low_rank") -> None:
    """Put an (empty) LowRankLinear of the given rank in place of each named linear, on the linear's device and
    dtype (the meta device when a checkpoint is being loaded): the model then has the factorized checkpoint's
    tensor names and shapes."""
    for name, rank in ranks.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if type(linear) is not nn.Linear:
            raise CheckpointError(f"{where} names {name!r}, which is not a linear layer of this model")
        replace_module(model, name, LowRankLinear(linear.in_features, linear.out_features, rank,
                                                  bias=linear.bias is not None, device=linear.weight.device,
                                                  dtype=linear.weight.dtype))


def refuse_factorized(model: nn.Module, command: str) -> None:
    """Commands that rewrite a model's linears by their roles (quantize, prune, convert, export) would drop or
    mangle the factors: they take plain models only."""
    ranks = low_rank_ranks(model)
    if ranks:
        raise ValueError(f"{command} takes a plain model, and {len(ranks)} linear layers of this one are factorized "
                         f"(danlu factorize; {next(iter(ranks))}, ...): run it on the model before factorizing, "
                         f"or on the one `danlu factorize --dense` writes")
