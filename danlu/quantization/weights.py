"""Weight-only quantization of a linear weight [out, in], as plain tensors (no modules, no kernels).

A `QuantizedWeight` holds integer codes and, per group of `group_size` consecutive input features of one
output row, a scale and (asymmetric) a zero point:

    int8: codes signed in [-127, 127] (symmetric) or [-128, 127] (asymmetric)   w = codes * scale + zero
    int4: codes in [0, 15]                                                        w = (codes - 8) * scale + zero

`zero` is None for symmetric quantization (w = 0 is then exact). The int4 form is the one PyTorch's
int4 kernels take (`_weight_int4pack_mm*`: w = (q - 8) * scale + zero per group) and the one llama.cpp's
Q4_0 (zero = 0) and Q4_1 (zero = min + 8 * scale) blocks map onto exactly; int8 per output row
(group_size = in_features) is what `_weight_int8pack_mm` takes. `in_features` need not be a multiple of the
group size: the last group of a row is then shorter (the codes are padded with the zero code).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

BITS = (4, 8)
INT4_OFFSET = 8  # int4 codes are unsigned; the kernels subtract 8


@dataclass
class QuantizedWeight:
    codes: torch.Tensor            # [out, groups * group_size]: int8 (bits 8) or uint8 in [0, 15] (bits 4)
    scales: torch.Tensor           # [out, groups] float32
    zeros: Optional[torch.Tensor]  # [out, groups] float32, or None (symmetric)
    bits: int
    group_size: int
    in_features: int

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits!r}")
        out, padded = self.codes.shape
        groups = math.ceil(self.in_features / self.group_size)
        if padded != groups * self.group_size or tuple(self.scales.shape) != (out, groups):
            raise ValueError(f"codes {tuple(self.codes.shape)} / scales {tuple(self.scales.shape)} do not fit "
                             f"{out}x{self.in_features} in groups of {self.group_size}")
        if self.zeros is not None and self.zeros.shape != self.scales.shape:
            raise ValueError(f"zeros {tuple(self.zeros.shape)} must have the scales' shape {tuple(self.scales.shape)}")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.codes.shape[0], self.in_features))

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = self.codes.shape[0]
        codes = self.codes.to(torch.float32)
        if self.bits == 4:
            codes.sub_(INT4_OFFSET)
        grouped = codes.view(out, -1, self.group_size).mul_(self.scales.float()[:, :, None])
        if self.zeros is not None:
            grouped.add_(self.zeros.float()[:, :, None])
        weight = grouped.view(out, -1)
        if weight.shape[1] != self.in_features:
            weight = weight[:, :self.in_features]
        return weight.to(dtype)

    def select_rows(self, index: torch.Tensor) -> "QuantizedWeight":
        """The output rows at `index` (1-D), in that order: a subset, or the rows permuted."""
        zeros = None if self.zeros is None else self.zeros[index]
        return QuantizedWeight(self.codes[index], self.scales[index], zeros, self.bits, self.group_size,
                               self.in_features)

    def nbytes(self) -> int:
        """Bytes as stored on disk: codes (int4 two to a byte) plus float32 scales and zeros."""
        codes = self.codes.numel() // (2 if self.bits == 4 else 1)
        return codes + 4 * self.scales.numel() * (1 if self.zeros is None else 2)


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, groups, group_size] float32, the last group padded by repeating the row's last value (so padding
    changes neither the group's min/max nor its absmax)."""
    weight = weight.detach().float()
    pad = (-weight.shape[1]) % group_size
    if pad:
        weight = torch.cat([weight, weight[:, -1:].expand(-1, pad)], dim=1)
    return weight.view(weight.shape[0], -1, group_size)


def quantize_weight(weight: torch.Tensor, bits: int, group_size: Optional[int] = None,
                    symmetric: bool = True) -> QuantizedWeight:
    """Round-to-nearest quantization of `weight` [out, in]; group_size None means one group per row."""
    if weight.dim() != 2:
        raise ValueError(f"a linear weight is 2-D [out, in]; got shape {tuple(weight.shape)}")
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    in_features = weight.shape[1]
    group_size = group_size or in_features
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    groups = _grouped(weight, group_size)
    if symmetric:
        levels = 127 if bits == 8 else 7  # int4: codes 1..15 around 8 (-7..7), as torchao's symmetric int4
        absmax = groups.abs().amax(dim=2)
        scales = torch.where(absmax > 0, absmax / levels, torch.ones_like(absmax))
        q = torch.round(groups / scales[:, :, None]).clamp(-levels, levels)
        zeros = None
    else:
        low, high = (-128, 127) if bits == 8 else (-INT4_OFFSET, 15 - INT4_OFFSET)
        minimum, maximum = groups.amin(dim=2), groups.amax(dim=2)
        span = maximum - minimum
        scales = torch.where(span > 0, span / (high - low), torch.ones_like(span))
        # zero is the value of the lowest code, so the group's minimum is represented exactly
        zeros = minimum - low * scales
        q = torch.round((groups - zeros[:, :, None]) / scales[:, :, None]).clamp(low, high)
    if bits == 4:
        codes = (q + INT4_OFFSET).to(torch.uint8)
    else:
        codes = q.to(torch.int8)
    return QuantizedWeight(codes.reshape(weight.shape[0], -1), scales, zeros, bits, group_size, in_features)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[out, k] codes in [0, 15] -> [out, k / 2] bytes, the even column in the low nibble."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def kernel_ready(weight: QuantizedWeight) -> QuantizedWeight:
    """The weight in a layout a kernel computes on: int8 must be per row, so group-wise int8 (GGUF's Q8_0) is
    rounded again per row from its values (one more rounding, of at most half a per-row step)."""
    if weight.bits == 8 and weight.group_size != weight.in_features:
        return quantize_weight(weight.dequantize(), 8, None, weight.symmetric)
    return weight
