"""Which consecutive layers each pipeline stage holds: one rule for pipeline-parallel training and for the
Megatron checkpoints' per-stage files (their layer numbers are local to the stage)."""
from __future__ import annotations

from typing import Optional


def stage_layers(num_layers: int, stages: int, first: Optional[int] = None,
                 last: Optional[int] = None) -> list[range]:
    """The layers of each of `stages` stages: `first` / `last` layers on the first / last stage when given
    (Megatron's decoder_first/last_pipeline_num_layers: those stages also run the embedding and the head), the
    rest split as evenly as possible, earlier stages taking one more. ValueError names the numbers."""
    if stages > num_layers:
        raise ValueError(f"pp={stages} stages over {num_layers} layers: each stage needs at least one layer")
    sizes: list[Optional[int]] = [None] * stages
    for position, count, name in ((0, first, "first"), (stages - 1, last, "last")):
        if count is None:
            continue
        if count < 1:
            raise ValueError(f"pipeline_{name}_stage_layers must be at least 1, got {count}")
        if stages == 1:
            raise ValueError(f"pipeline_{name}_stage_layers={count} needs pp > 1")
        sizes[position] = count
    free = [i for i, size in enumerate(sizes) if size is None]
    left = num_layers - sum(size for size in sizes if size is not None)
    if (free and left < len(free)) or (not free and left != 0):
        given = ", ".join(f"{name} {count}" for name, count in (("first", first), ("last", last)) if count)
        raise ValueError(f"pp={stages} stages over {num_layers} layers with the {given} stage layers given leaves "
                         f"{left} layer(s) for the other {len(free)} stage(s), which need at least one each"
                         if free else f"pp={stages}: the {given} stage layers add up to "
                         f"{num_layers - left}, not the model's {num_layers} layers")
    for k, i in enumerate(free):
        sizes[i] = left // len(free) + (k < left % len(free))
    starts = [sum(sizes[:i]) for i in range(stages)]
    return [range(start, start + size) for start, size in zip(starts, sizes)]
