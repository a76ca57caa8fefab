"""Which teacher layer each student layer learns from, and which teacher layers a student starts from.

Layers are counted as in `Intermediates.hidden_states`: 0 is the embedding output, m (1..M) the output of
block m. A map is a tuple of (student layer, teacher layer) pairs.
"""
from __future__ import annotations

LayerMap = tuple[tuple[int, int], ...]


def evenly_spaced_layers(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher blocks (0-based) a student of `student_layers` blocks is initialised from: floor(i N / M),
    so every other block when M = N / 2 (DistilBERT: 0, 2, 4, ...)."""
    if not 0 < student_layers <= teacher_layers:
        raise ValueError(f"student_layers must be between 1 and the teacher's {teacher_layers} layers, "
                         f"got {student_layers}")
    return [i * teacher_layers // student_layers for i in range(student_layers)]


def uniform_map(student_layers: int, teacher_layers: int) -> LayerMap:
    """TinyBERT's g(m) = m N / M for m = 1..M: each student block learns the teacher block ending its stretch."""
    return tuple((m, m * teacher_layers // student_layers) for m in range(1, student_layers + 1))


def pkd_skip_map(student_layers: int, teacher_layers: int) -> LayerMap:
    """Patient-KD-skip: student block j learns teacher block j N / M, for j < M (the last is the logits' job):
    I_pt = {2, 4, 6, 8, 10} for 12 -> 6."""
    return uniform_map(student_layers, teacher_layers)[:-1]


def pkd_last_map(student_layers: int, teacher_layers: int) -> LayerMap:
    """Patient-KD-last: the student's first M - 1 blocks learn the teacher's last ones before its final block:
    I_pt = {7, 8, 9, 10, 11} for 12 -> 6."""
    offset = teacher_layers - student_layers
    return tuple((j, offset + j) for j in range(1, student_layers))


def parse_layer_map(text: str, student_layers: int, teacher_layers: int) -> LayerMap:
    """`--layer_map "1:2,2:4,3:6"` (student:teacher, 0 = the embeddings) -> pairs, each checked."""
    pairs = []
    for item in text.split(","):
        student, sep, teacher = item.strip().partition(":")
        if not sep or not student.strip().isdigit() or not teacher.strip().isdigit():
            raise ValueError(f"layer_map: expected student:teacher pairs such as '1:2,2:4', got {item.strip()!r}")
        pair = int(student), int(teacher)
        if pair[0] > student_layers or pair[1] > teacher_layers:
            raise ValueError(f"layer_map: {item.strip()!r} is out of range: the student has layers 0..{student_layers} "
                             f"and the teacher 0..{teacher_layers} (0 = the embeddings)")
        pairs.append(pair)
    return tuple(pairs)
