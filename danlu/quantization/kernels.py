"""Matrix products on quantized weights: PyTorch's packed int8/int4 kernels, and the reference path.

The kernels (aten ops, no extension to build):
* int8, per output row: `_weight_int8pack_mm(x, codes, scales)` on CPU (and MPS), input size a multiple of
  16 (columns of zero codes are added). It is fast only with bf16 activations (measured here: ~50 us vs 69 us for float32 F.linear at 1x576x1536; with float32
  activations it takes a path 10-15x slower), so activations are cast to bf16 around it.
* int4, group-wise: `_weight_int4pack_mm_for_cpu` on CPU, `_weight_int4pack_mm` on CUDA (sm80+), both on
  codes repacked once into the kernel's own layout, with bf16 [groups, out, 2] scales-and-zeros
  (w = (q - 8) * scale + zero). The CPU layout wants the output size a multiple of 16; rows are padded.
On CUDA there is no int8 kernel: the reference path `F.linear(x, codes.to(x.dtype)) * scales` is what
torch.compile fuses (gpt-fast's int8 path).

And for int8 per-row weights with more than a few rows of activations (a batch decoding together, a prefill), the
activations are quantized too, per row (dynamic absmax / 127, SmoothQuant's per-token scheme without the
smoothing), and multiplied with the codes in one integer matrix product, `torch._int_mm` (VNNI / AMX on x86).
Measured here (1 thread, 576 -> 1536): 8 rows 198 us vs 350 us for `_weight_int8pack_mm`, 64 rows 434 us vs
1144 us for float32 F.linear, 512 rows 3.6 ms vs 7.4 ms; at 1-4 rows the weight-only kernel is faster.

Every packed form is built from the portable codes by `pack_for_kernel` and depends on the device; the
reference path (`dequantize` + F.linear in the activations' dtype) works everywhere and is the one to
compare against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from danlu.quantization.weights import QuantizedWeight

KERNEL_DTYPE = torch.bfloat16
CPU_INT4_ROW_MULTIPLE = 16
CPU_INT8_COLUMN_MULTIPLE = 16  # _weight_int8pack_mm reads past the end (and crashes) on other input sizes
CUDA_INNER_K_TILES = 8


@dataclass
class KernelWeight:
    """A quantized weight in the layout of one device's kernel (built once, kept beside the portable form)."""
    kind: str                    # "int8" | "int4_cpu" | "int4_cuda"
    packed: torch.Tensor
    scales: torch.Tensor         # int8: [out] bf16; int4: [groups, out_padded, 2] bf16 scales and zeros
    zeros: Optional[torch.Tensor]  # int8 asymmetric: [out] in the activations' dtype
    out_features: int
    padded_in: int
    float_scales: Optional[torch.Tensor] = None  # int8: [out] float32, for the int8-activation product


def has_int4_kernel(device: torch.device) -> bool:
    if device.type == "cpu":
        return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return False


def has_int8_kernel(device: torch.device) -> bool:
    return device.type in ("cpu", "mps")


def pack_for_kernel(weight: QuantizedWeight) -> Optional[KernelWeight]:
    """The kernel layout of `weight` on its device, or None where no kernel takes it."""
    device = weight.codes.device
    out = weight.codes.shape[0]
    if weight.bits == 8:
        if weight.group_size != weight.in_features or not has_int8_kernel(device):
            return None
        zeros = None if weight.zeros is None else weight.zeros[:, 0]
        codes, pad = weight.codes, (-weight.in_features) % CPU_INT8_COLUMN_MULTIPLE
        if pad:  # columns of zero codes add nothing; without padding the kernel shares the layer's own codes
            codes = F.pad(codes, (0, pad))
        return KernelWeight("int8", codes.contiguous(), weight.scales[:, 0].to(KERNEL_DTYPE), zeros, out,
                            codes.shape[1], weight.scales[:, 0].float().contiguous())
    if not has_int4_kernel(device) or weight.codes.shape[1] % 2:
        return None
    codes, scales = weight.codes, weight.scales
    zeros = weight.zeros if weight.zeros is not None else torch.zeros_like(scales)
    pad_rows = (-out) % CPU_INT4_ROW_MULTIPLE
    if pad_rows:  # extra rows of the zero code with zero scale give zero outputs, cut off after the product
        codes = F.pad(codes, (0, 0, 0, pad_rows), value=8)
        scales, zeros = F.pad(scales, (0, 0, 0, pad_rows)), F.pad(zeros, (0, 0, 0, pad_rows))
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
    if device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        kind = "int4_cpu"
    else:
        pairs = codes.to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack((pairs[:, ::2] << 4 | pairs[:, 1::2]).contiguous(),
                                                             CUDA_INNER_K_TILES)
        kind = "int4_cuda"
    return KernelWeight(kind, packed, scales_and_zeros, None, out, codes.shape[1])


def kernel_linear(x: torch.Tensor, weight: KernelWeight, group_size: int) -> torch.Tensor:
    """x [..., in] @ W^T through the kernel: bf16 inside, the result in x's dtype."""
    leading = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    flat = rows.to(KERNEL_DTYPE)
    if flat.shape[1] < weight.padded_in:
        flat = F.pad(flat, (0, weight.padded_in - flat.shape[1]))
    if weight.kind == "int8":
        y = torch.ops.aten._weight_int8pack_mm(flat, weight.packed, weight.scales)
        if weight.zeros is not None:  # w = q * s + z: the zero adds z times the sum of the inputs
            y = y.to(x.dtype) + rows.sum(dim=1, keepdim=True) * weight.zeros.to(x.dtype)
    elif weight.kind == "int4_cpu":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, weight.packed, group_size, weight.scales)
    else:
        y = torch.ops.aten._weight_int4pack_mm(flat, weight.packed, group_size, weight.scales)
    return y[:, :weight.out_features].to(x.dtype).reshape(*leading, weight.out_features)


def has_int8_matmul(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch, "_int_mm")


def int8_activation_linear(x: torch.Tensor, weight: KernelWeight) -> torch.Tensor:
    """x [..., in] @ W^T with x quantized per row to int8: an int32 product of the codes, rescaled by both scales."""
    leading = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1]).float()
    if rows.shape[1] < weight.padded_in:
        rows = F.pad(rows, (0, weight.padded_in - rows.shape[1]))
    row_scales = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    codes = torch.round(rows / row_scales).to(torch.int8)
    y = torch._int_mm(codes, weight.packed.t()).float() * row_scales * weight.float_scales
    if weight.zeros is not None:  # w = q * s + z: the zero adds z times the sum of the inputs
        y = y + rows.sum(dim=1, keepdim=True) * weight.zeros.float()
    return y.to(x.dtype).reshape(*leading, weight.out_features)


def reference_linear(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x @ dequantize(W)^T in x's dtype: exact up to that dtype, on any device."""
    if weight.bits == 8 and weight.group_size == weight.in_features and x.device.type == "cuda":
        # gpt-fast's form: torch.compile fuses the cast and the scaling into the matmul's epilogue
        y = F.linear(x, weight.codes.to(x.dtype)) * weight.scales[:, 0].to(x.dtype)
        if weight.zeros is not None:
            y = y + x.sum(dim=-1, keepdim=True) * weight.zeros[:, 0].to(x.dtype)
        return y
    return F.linear(x, weight.dequantize(x.dtype))
