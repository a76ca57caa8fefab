"""QLoRA's quantized base weights (Dettmers et al., 2023) in plain PyTorch: NF4 or int8, frozen.

`quantize_model(model, 4)` swaps every linear layer (but the head) for a `QuantizedLinear` that keeps its
weight as codes plus scales and rebuilds it in the input's dtype at each call; `apply_lora` then wraps those
layers as it wraps any linear, and only the adapters train, as in QLoRA.

* **NF4** (bits=4): the weight, flattened row-major and zero-padded to whole blocks, is cut into blocks of 64
  values; each block stores its absolute maximum and, per value, the index of the nearest of the 16 NF4 levels
  (bitsandbytes' table) to value / absmax, two indices per byte (the first in the high nibble, as
  bitsandbytes packs them). With double quantization (the QLoRA default) the absmax constants themselves are
  stored in 8 bits: their mean is subtracted and the rest quantized blockwise (256 per block) to bitsandbytes'
  8-bit dynamic map, so a weight costs 4 + 8/64 + 32/(64*256) ≈ 4.13 bits instead of 4 + 32/64 = 4.5.
* **int8** (bits=8): one absmax per output row (LLM.int8()'s vector-wise scale), codes round(w * 127 / absmax).

The layer subclasses nn.Linear (without an nn.Linear weight parameter), so everything that looks for linear
layers, `danlu.tuning.surgery.base_linears` included, finds it; `.weight` is a property that returns the
dequantized weight, and assigning to it quantizes again (which is how LoRALinear.merge folds an adapter in).
The backward pass dequantizes again rather than keeping a float copy of each weight alive for it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from danlu.tuning.surgery import base_linears, replace_module

ALLOWED_BITS = (4, 8)
NF4_BLOCK_SIZE = 64  # QLoRA's block size for the weights
ABSMAX_BLOCK_SIZE = 256  # and for the second quantization of their absmax constants

# The 16 NormalFloat4 levels exactly as bitsandbytes defines them (create_normal_map(0.9677083) rounded to
# float32; the same constants are hard-coded in its CUDA kernels): quantiles of N(0, 1) scaled to [-1, 1],
# with an exact zero and one more positive level than negative.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic data type (256 sorted levels in [-1, 1]; Dettmers 2015).

    Level magnitudes are 10^-k times the midpoints of an even grid on [0.1, 1], with 2^j midpoints for the
    decade j = 0..6 (k = 6 - j), each with both signs, plus 0 and 1.
    """
    levels = [torch.zeros(1), torch.ones(1)]
    for j in range(7):
        edges = torch.linspace(0.1, 1, 2 ** j + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10 ** (j - 6)) * mids
        levels += [scaled, -scaled]
    return torch.cat(levels).sort().values


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(kind: str, device: torch.device) -> torch.Tensor:
    key = (kind, torch.device(device))
    if key not in _TABLES:
        values = torch.tensor(NF4_VALUES, dtype=torch.float32) if kind == "nf4" else dynamic_map()
        _TABLES[key] = values.to(device)
    return _TABLES[key]


def _nearest(normalized: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (sorted levels; a tie goes to the lower one, as bitsandbytes' kernels)."""
    midpoints = (levels[:-1] + levels[1:]) / 2
    return torch.bucketize(normalized, midpoints)


def _blockwise(values: torch.Tensor, block_size: int, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [padded numel] (uint8) and absmax [blocks] (float32) of a tensor quantized block by block."""
    flat = values.detach().reshape(-1).float()
    pad = (-flat.numel()) % block_size
    if pad:
        flat = F.pad(flat, (0, pad))
    blocks = flat.view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = _nearest(blocks / safe[:, None], levels.to(flat.device))
    return codes.reshape(-1).to(torch.uint8), absmax


def _unblock(codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, numel: int) -> torch.Tensor:
    blocks = levels[codes.int()].view(absmax.numel(), -1) * absmax[:, None]
    return blocks.reshape(-1)[:numel]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble (bitsandbytes' order); even length."""
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1)


class _QuantizedMatmul(torch.autograd.Function):
    """y = x W^T + b with W rebuilt from its codes in forward and again in backward (nothing float is kept)."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer = layer
        ctx.bias_requires_grad = bias is not None and bias.requires_grad
        weight = layer.dequantize(x.dtype)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.layer.dequantize(grad_out.dtype)
        if ctx.bias_requires_grad:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


class QuantizedLinear(nn.Linear):
    """A frozen linear layer whose weight is stored as NF4 (bits=4) or int8 (bits=8) codes.

    Buffers (what state_dict holds): `qweight` (uint8 packed nibbles for NF4, int8 [out, in] for int8) and
    either `absmax` (float32, one per block or row) or, with double quantization, `qabsmax` (uint8),
    `absmax2` (float32, one per 256 blocks) and `absmax_offset` (float32 scalar). The float scales stay float32
    whatever dtype the model is moved to; `compute_dtype` follows it and is the dtype of `.weight`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 block_size: int = NF4_BLOCK_SIZE, double_quant: bool = True,
                 device=None, dtype: Optional[torch.dtype] = None):
        nn.Module.__init__(self)  # not nn.Linear's: it would make a float weight parameter
        check_bits(bits)
        if bits == 4 and (block_size <= 0 or block_size % 2):
            raise ValueError(f"block_size must be a positive even number, got {block_size}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.block_size = bits, block_size
        self.double_quant = bits == 4 and double_quant
        self.compute_dtype = dtype or torch.get_default_dtype()
        numel = in_features * out_features
        if bits == 4:
            blocks = math.ceil(numel / block_size)
            self.register_buffer("qweight", torch.zeros(blocks * block_size // 2, dtype=torch.uint8, device=device))
            if self.double_quant:
                self.register_buffer("qabsmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
                self.register_buffer("absmax2", torch.zeros(math.ceil(blocks / ABSMAX_BLOCK_SIZE),
                                                            dtype=torch.float32, device=device))
                self.register_buffer("absmax_offset", torch.zeros((), dtype=torch.float32, device=device))
            else:
                self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.float32, device=device))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("absmax", torch.zeros(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.compute_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, block_size: int = NF4_BLOCK_SIZE,
                    double_quant: bool = True) -> "QuantizedLinear":
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, bits=bits,
                    block_size=block_size, double_quant=double_quant, device=weight.device, dtype=weight.dtype)
        if layer.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        if weight.device.type != "meta":
            layer.quantize_(weight)
        return layer

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> None:
        """Store `weight` ([out, in]) in this layer's format, replacing what it held."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit a "
                             f"{self.out_features}x{self.in_features} layer")
        device = self.qweight.device
        weight = weight.detach().to(device)
        if self.bits == 8:
            w = weight.float()
            absmax = w.abs().amax(dim=1)
            scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax)) / 127
            self.qweight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
            self.absmax.copy_(absmax)
            return
        codes, absmax = _blockwise(weight, self.block_size, _table("nf4", device))
        self.qweight.copy_(pack_nibbles(codes))
        if not self.double_quant:
            self.absmax.copy_(absmax)
            return
        offset = absmax.mean()
        qabsmax, absmax2 = _blockwise(absmax - offset, ABSMAX_BLOCK_SIZE, _table("dynamic", device))
        self.qabsmax.copy_(qabsmax[:absmax.numel()])
        self.absmax2.copy_(absmax2)
        self.absmax_offset.copy_(offset)

    # -- reading ------------------------------------------------------------------------------------------
    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax constants (rebuilt from their 8-bit codes under double quantization)."""
        if not self.double_quant:
            return self.absmax
        table = _table("dynamic", self.qabsmax.device)
        pad = (-self.qabsmax.numel()) % ABSMAX_BLOCK_SIZE
        codes = F.pad(self.qabsmax, (0, pad)) if pad else self.qabsmax
        return _unblock(codes, self.absmax2, table, self.qabsmax.numel()) + self.absmax_offset

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight [out, in] in `dtype` (the layer's compute dtype by default)."""
        dtype = dtype or self.compute_dtype
        if self.bits == 8:
            weight = self.qweight.float() * (self.absmax / 127)[:, None]
            return weight.to(dtype)
        table = _table("nf4", self.qweight.device)
        numel = self.in_features * self.out_features
        weight = _unblock(unpack_nibbles(self.qweight), self.block_absmax(), table, numel)
        return weight.view(self.out_features, self.in_features).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        # Assigning a full weight (LoRALinear.merge's `base.weight += delta`) quantizes it again: lossy,
        # as PEFT's merge into a bitsandbytes 4-bit layer. Dequantize the model first for an exact merge.
        self.quantize_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantizedMatmul.apply(x, self.bias, self)

    def storage_bytes(self) -> int:
        """Bytes the weight takes as stored (codes and scales; the bias is not counted)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def _apply(self, fn, recurse=True):
        # Codes are integers and stay as they are; the float32 scales move device but never change dtype
        # (model.to(torch.bfloat16) would otherwise round them); compute_dtype follows the model.
        scales = {name: self._buffers.pop(name) for name in ("absmax", "absmax2", "absmax_offset")
                  if name in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            device = self.qweight.device
            for name, tensor in scales.items():
                self._buffers[name] = tensor.to(device)
        probe = fn(torch.zeros((), dtype=self.compute_dtype, device=device))
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        kind = "nf4" + (", double_quant" if self.double_quant else "") if self.bits == 4 else "int8"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {kind}, compute_dtype={self.compute_dtype}")


def check_bits(bits: int) -> None:
    if bits not in ALLOWED_BITS:
        raise ValueError(f"quantization bits must be one of {ALLOWED_BITS} (4 = NF4, 8 = int8), got {bits!r}")


def quantize_model(model: nn.Module, bits: int, skip: tuple[str, ...] = ("lm_head",),
                   block_size: int = NF4_BLOCK_SIZE, double_quant: bool = True) -> list[str]:
    """Replace every plain nn.Linear of the model (but those whose name ends with a `skip` entry) with a frozen
    QuantizedLinear, in place; returns where they sit. bits: 4 = NF4 (blockwise, optional double
    quantization), 8 = int8 per output row. A layer wrapped by LoRA has its base_layer quantized, its
    adapters never."""
    check_bits(bits)
    skip = tuple(skip)
    chosen = [linear for linear in base_linears(model)
              if type(linear.module) is nn.Linear and not (skip and linear.name.endswith(skip))]
    for linear in chosen:
        replace_module(model, linear.path, QuantizedLinear.from_linear(linear.module, bits, block_size, double_quant))
    return [linear.path for linear in chosen]


def dequantize_model(model: nn.Module) -> list[str]:
    """Turn every QuantizedLinear back into an nn.Linear holding its dequantized weight (for merging and
    export); returns where they sit."""
    chosen = [linear for linear in base_linears(model) if isinstance(linear.module, QuantizedLinear)]
    for linear in chosen:
        q = linear.module
        plain = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None,
                          device=q.qweight.device, dtype=q.compute_dtype)
        with torch.no_grad():
            plain.weight.copy_(q.dequantize())
            if q.bias is not None:
                plain.bias.copy_(q.bias)
        plain.requires_grad_(False)
        replace_module(model, linear.path, plain)
    return [linear.path for linear in chosen]


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes taken by the weights of the model's linear layers (LoRA adapters excluded) as stored:
    codes and scales for a QuantizedLinear, the weight tensor for a plain nn.Linear. Biases not counted."""
    total = 0
    for linear in base_linears(model):
        m = linear.module
        total += m.storage_bytes() if isinstance(m, QuantizedLinear) else m.weight.numel() * m.weight.element_size()
    return total
