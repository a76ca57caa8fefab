"""Training stages as recipes: each builds a Stage (data, collate, step) for the one loop in loop.py."""
from __future__ import annotations

from danlu.training.recipes import pt, sft

RECIPES = {"pt": pt.build_stage, "sft": sft.build_stage}
