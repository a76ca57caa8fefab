"""Training stages as recipes: each builds a Stage (data, collate, step) for the one loop in loop.py."""
from __future__ import annotations

from danlu.training.recipes import dpo, kd, kto, ppo, pt, rm, sft

RECIPES = {"pt": pt.build_stage, "sft": sft.build_stage, "rm": rm.build_stage, "dpo": dpo.build_stage,
           "kto": kto.build_stage, "ppo": ppo.build_stage, "kd": kd.build_stage}
