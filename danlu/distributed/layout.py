"""The parallel layout of a run: how many ways it replicates (dp), shards (fsdp), splits layers (tp) and
stages (pp) the model. Their product is the number of processes torchrun starts.

`--parallel dp=2,fsdp=1,tp=1,pp=1` says it directly (missing keys are 1); without it, every process is a
data-parallel replica (dp = WORLD_SIZE). A LLaMA-Factory `--deepspeed CONFIG.json` is read for its
`zero_optimization.stage` and mapped onto FSDP2, which is not DeepSpeed, so the mapping is by intent:

- stage 0 (no ZeRO): dp = WORLD_SIZE, plain replicated data parallel.
- stage 1 and 2 (optimizer state, and gradients, sharded; full parameters on every rank): fsdp = WORLD_SIZE
  with reshard_after_forward=False. FSDP2 shards the optimizer state and reduce-scatters the gradients as
  ZeRO-2 does, and keeps the gathered parameters from the forward to the backward pass; but between steps
  it keeps only its parameter shard where ZeRO-1/2 keep the whole parameters, so it uses less memory than
  ZeRO-1/2 and all-gathers the parameters once per step (ZeRO-1 instead all-reduces the gradients).
- stage 3 (parameters sharded too): fsdp = WORLD_SIZE, reshard_after_forward=True (gathered again for the
  backward pass), which is what ZeRO-3 does.
DeepSpeed's CPU offload settings are not mapped (a warning says so); the rest of its file is not read.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from danlu.utils.progress import logger

DIMENSIONS = ("dp", "fsdp", "tp", "pp")
PARAMETER_SERVER = "ps"  # ps=K: a parameter server (rank 0) and K workers, alone (distributed/parameter_server)
LOCAL_MODELS = "local"  # local=K: K workers training local models, aggregated every few steps (aggregation.py)
ALONE = (PARAMETER_SERVER, LOCAL_MODELS)  # layouts that take no other dimension
ZERO_STAGES = (0, 1, 2, 3)
PIPELINE_SCHEDULES = ("1f1b", "gpipe")  # torch.distributed.pipelining's Schedule1F1B and ScheduleGPipe


class LayoutError(ValueError):
    """A parallel layout that cannot be, named with its numbers."""


@dataclass(frozen=True)
class ParallelLayout:
    dp: int = 1  # replicated data parallel (DDP)
    fsdp: int = 1  # sharded data parallel (FSDP2)
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    reshard_after_forward: bool = True  # fsdp: free the gathered parameters after the forward pass (ZeRO-3)
    ps: int = 0  # > 0: that many parameter-server workers, besides the server; then no other dimension
    local: int = 0  # > 0: that many workers training local models, aggregated every sync_every steps; alone

    def __post_init__(self) -> None:
        for name in DIMENSIONS:
            if getattr(self, name) < 1:
                raise LayoutError(f"parallel: {name} must be a positive integer, got {getattr(self, name)}")
        given = [name for name in ALONE if getattr(self, name)]
        others = [f"{n}={getattr(self, n)}" for n in DIMENSIONS if getattr(self, n) > 1] + [
            f"{n}={getattr(self, n)}" for n in given[1:]]
        if given and others:
            what = {"ps": "a parameter server and its workers", "local": "workers training local models"}
            raise LayoutError(f"parallel: {given[0]}={getattr(self, given[0])} ({what[given[0]]}) does not combine "
                              f"with {', '.join(others)}")

    @property
    def world_size(self) -> int:
        if self.ps:
            return self.ps + 1
        if self.local:
            return self.local
        return math.prod(getattr(self, name) for name in DIMENSIONS)

    def __str__(self) -> str:
        for name in ALONE:
            if getattr(self, name):
                return f"{name}={getattr(self, name)}"
        return ",".join(f"{name}={getattr(self, name)}" for name in DIMENSIONS)


def parse_parallel(text: str) -> dict[str, int]:
    """`"dp=2,fsdp=1"` -> {"dp": 2, "fsdp": 1}; a key that is not dp, fsdp, tp or pp, a part that is not
    key=value or a size that is not a positive integer raises LayoutError naming it."""
    sizes: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise LayoutError(f"parallel: {part!r} in {text!r} is not key=value; expected e.g. "
                              f"dp=2,fsdp=1,tp=1,pp=1")
        if key not in (*DIMENSIONS, *ALONE):
            raise LayoutError(f"parallel: unknown key {key!r} in {text!r}; expected {', '.join(DIMENSIONS)} "
                              f"(or alone: ps=K, a parameter server and K workers; local=K, K local models)")
        if key in sizes:
            raise LayoutError(f"parallel: {key} is given twice in {text!r}")
        if not value.isdigit() or int(value) < 1:
            raise LayoutError(f"parallel: {key}={value!r} in {text!r} is not a positive integer")
        sizes[key] = int(value)
    return sizes


def deepspeed_zero_stage(path: str) -> int:
    """`zero_optimization.stage` of a DeepSpeed JSON config (0 when the section is absent, as DeepSpeed)."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise LayoutError(f"deepspeed: cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise LayoutError(f"deepspeed: {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    zero = config.get("zero_optimization", {}) if isinstance(config, dict) else None
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise LayoutError(f"deepspeed: {path}: zero_optimization.stage must be one of "
                          f"{', '.join(map(str, ZERO_STAGES))}, got {stage!r}")
    if isinstance(zero, dict) and any(zero.get(key) for key in ("offload_optimizer", "offload_param")):
        logger.warning("deepspeed: %s asks for CPU offload, which danlu does not map; parameters and optimizer "
                       "state stay on the device", path)
    return stage


def deepspeed_layout(path: str, world_size: int) -> ParallelLayout:
    """The FSDP2/DDP layout a DeepSpeed ZeRO config stands for (see the module docstring)."""
    stage = deepspeed_zero_stage(path)
    if stage == 0:
        return ParallelLayout(dp=world_size)
    return ParallelLayout(fsdp=world_size, reshard_after_forward=stage == 3)


def resolve_layout(parallel: Optional[str], deepspeed: Optional[str], world_size: int) -> ParallelLayout:
    """The layout of a run of `world_size` processes from --parallel or --deepspeed (dp = world_size without
    either); LayoutError when the sizes do not multiply to world_size."""
    if parallel and deepspeed:
        raise LayoutError(f"parallel {parallel!r} and deepspeed {deepspeed!r} both give the layout; use one")
    if deepspeed:
        return deepspeed_layout(deepspeed, world_size)
    if not parallel:
        return ParallelLayout(dp=world_size)
    layout = ParallelLayout(**parse_parallel(parallel))
    if layout.ps and layout.world_size != world_size:
        raise LayoutError(f"parallel {parallel!r}: a parameter server and {layout.ps} workers are {layout.world_size} "
                          f"processes, but the world size (WORLD_SIZE, torchrun's processes) is {world_size}; "
                          f"run torchrun --nproc_per_node {layout.world_size}")
    if layout.local and layout.world_size != world_size:
        raise LayoutError(f"parallel {parallel!r}: {layout.local} local models are {layout.local} processes, but the "
                          f"world size (WORLD_SIZE, torchrun's processes) is {world_size}")
    if layout.world_size != world_size:
        product = " x ".join(str(getattr(layout, name)) for name in DIMENSIONS)
        raise LayoutError(f"parallel {parallel!r}: dp x fsdp x tp x pp = {product} = {layout.world_size}, but "
                          f"the world size (WORLD_SIZE, torchrun's processes) is {world_size}")
    return layout
