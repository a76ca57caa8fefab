"""The role of each linear and embedding of the model, declared once.

Tensor parallelism, the Megatron converter and target resolution (LoRA, pruning, width slicing) all read
this table instead of each keeping its own list of names:

* column: the output features are split across ranks (q/k/v and the MLP's gate/up projections);
* row: the input features are split, and the partial outputs are summed (o_proj, down_proj);
* vocab: the vocabulary dimension is split (the token embedding and the output head).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

COLUMN, ROW, VOCAB = "column", "row", "vocab"
ROLES = (COLUMN, ROW, VOCAB)

# By the module's own name (the last part of its dotted name), as transformer.py names them.
ROLE_OF_MODULE: dict[str, str] = {
    "q_proj": COLUMN,
    "k_proj": COLUMN,
    "v_proj": COLUMN,
    "gate_proj": COLUMN,
    "up_proj": COLUMN,
    "o_proj": ROW,
    "down_proj": ROW,
    "embed_tokens": VOCAB,
    "lm_head": VOCAB,
}


def role_of(module_name: str) -> Optional[str]:
    """The role of a module by its dotted name (a wrapper's `.base_layer` suffix is looked through)."""
    leaf = module_name.removesuffix(".base_layer").rsplit(".", 1)[-1]
    return ROLE_OF_MODULE.get(leaf)


def modules_with_role(model: nn.Module, *roles: str) -> list[str]:
    """Dotted names of the model's modules that have one of `roles`, in module order."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown role(s) {sorted(unknown)}; roles are {list(ROLES)}")
    return [name for name, _ in model.named_modules() if name and role_of(name) in roles
            and not name.endswith(".base_layer")]
