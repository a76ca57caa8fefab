"""ggml's (llama.cpp's) quantized block types read as `QuantizedWeight`s, without a float detour.

A row of a GGUF tensor is a run of blocks of 32 weights, each block its own scale (ggml's `block_q4_0`,
`block_q4_1`, `block_q8_0`, little-endian):

    Q4_0  d: f16, qs: 16 bytes          w = d * (q - 8)      q = qs[j] & 15 for j < 16, qs[j - 16] >> 4 after
    Q4_1  d: f16, m: f16, qs: 16 bytes  w = d * q + m        (the same nibble order)
    Q8_0  d: f16, qs: 32 x int8         w = d * q

These are exactly int4 group-32 codes (Q4_0 symmetric; Q4_1 with zero = m + 8 d, since
d * q + m = (q - 8) * d + (m + 8 d)) and int8 group-32 codes, so the values are kept, not re-rounded.
"""
from __future__ import annotations

import numpy as np
import torch

from danlu.quantization.weights import QuantizedWeight

BLOCK = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def _blocks(data: np.ndarray, kind: str, rows: int, columns: int) -> np.ndarray:
    if columns % BLOCK:
        raise ValueError(f"{kind} rows hold whole blocks of {BLOCK}; a row of {columns} does not divide")
    blocks = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    expected = rows * columns // BLOCK * BLOCK_BYTES[kind]
    if blocks.size != expected:
        raise ValueError(f"{kind} tensor of {rows}x{columns} needs {expected} bytes, the file holds {blocks.size}")
    return blocks.reshape(rows, columns // BLOCK, BLOCK_BYTES[kind])


def _half(blocks: np.ndarray, offset: int) -> torch.Tensor:
    """The f16 at `offset` of every block, as float32 [rows, blocks]."""
    values = np.ascontiguousarray(blocks[:, :, offset:offset + 2]).view(np.float16)[..., 0]
    return torch.from_numpy(values.astype(np.float32))


def _nibbles(qs: np.ndarray) -> torch.Tensor:
    """[rows, blocks, 16] bytes -> [rows, blocks * 32] codes: the low nibbles are the block's first 16."""
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=2)
    return torch.from_numpy(codes.reshape(qs.shape[0], -1))


def read_blocks(data: np.ndarray, kind: str, rows: int, columns: int) -> QuantizedWeight:
    """A [rows, columns] weight stored as ggml blocks of `kind` (Q4_0, Q4_1 or Q8_0)."""
    if kind not in BLOCK_BYTES:
        raise ValueError(f"ggml type {kind} is not read as quantized blocks; danlu reads {sorted(BLOCK_BYTES)}")
    blocks = _blocks(data, kind, rows, columns)
    scales = _half(blocks, 0)
    if kind == "Q8_0":
        codes = torch.from_numpy(np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(rows, columns))
        return QuantizedWeight(codes, scales, None, 8, BLOCK, columns)
    if kind == "Q4_0":
        return QuantizedWeight(_nibbles(blocks[:, :, 2:]), scales, None, 4, BLOCK, columns)
    zeros = _half(blocks, 2) + 8 * scales
    return QuantizedWeight(_nibbles(blocks[:, :, 4:]), scales, zeros, 4, BLOCK, columns)
