"""A linear layer that keeps its weight quantized (int8 per output row, or int4 group-wise) and computes
on it directly.

What `state_dict` holds is the portable form (`qweight`: int8 [out, in'] or, for int4, two codes to a byte
[out, in'/2], the even column in the low nibble; `scales` and, asymmetric, `zeros`: float32 [out, groups];
`bias`), in' being in_features rounded up to whole groups. The kernel's own layout is built from it on the
first forward on a device and kept (`danlu.quantization.kernels`); where no kernel applies (another device,
or a backward pass is needed) the layer multiplies by the dequantized weight instead.

The layer subclasses nn.Linear (without an nn.Linear weight parameter), so everything that looks for linear
layers (`danlu.tuning.surgery.base_linears`, LoRA, serving's per-request adapters) finds it; `.weight`
returns the dequantized weight and assigning to it quantizes again.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from danlu.quantization.kernels import (has_int8_matmul, int8_activation_linear, kernel_linear, pack_for_kernel,
                                        reference_linear)
from danlu.quantization.weights import QuantizedWeight, pack_int4, quantize_weight, unpack_int4

# Measured here (1 thread, 576 -> 1536): int4/int8 kernel 214/232 us at 8 rows, 850/900 us at 32, 1660/1800 at 64;
# float32 F.linear 380 / 580 / 950 us plus a dequantization of ~300-600 us.
KERNEL_MAX_ROWS = 48
# With int8 activations on (transform.use_int8_activations), an int8 per-row weight multiplies them from this many
# rows on, at any row count: 8 rows 198 us vs 350 us for the weight-only kernel, 512 rows 3.6 ms vs 7.4 ms for
# float32 F.linear.
INT8_ACTIVATION_MIN_ROWS = 5


class WeightOnlyLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: Optional[int],
                 symmetric: bool = True, device=None, dtype: Optional[torch.dtype] = None):
        nn.Module.__init__(self)  # not nn.Linear's: it would make a float weight parameter
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.symmetric = bits, symmetric
        self.group_size = group_size or in_features
        self.compute_dtype = dtype or torch.get_default_dtype()
        self.use_kernel = True
        self.int8_activations = False  # see transform.use_int8_activations
        self.exact_top = 0  # > 0 for an output head: see _recompute_top
        groups = math.ceil(in_features / self.group_size)
        padded = groups * self.group_size
        if bits == 8:
            qweight = torch.zeros(out_features, padded, dtype=torch.int8, device=device)
        else:
            qweight = torch.zeros(out_features, (padded + 1) // 2, dtype=torch.uint8, device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        if symmetric:
            self.register_buffer("zeros", None)
        else:
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.compute_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._kernel = None
        self._kernel_stale = True  # the codes changed since the kernel layout was built

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: Optional[int] = None,
                    symmetric: bool = True) -> "WeightOnlyLinear":
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size, symmetric,
                    device=weight.device, dtype=weight.dtype)
        layer.set_quantized(quantize_weight(weight, bits, layer.group_size, symmetric))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    @classmethod
    def from_quantized(cls, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                       dtype: Optional[torch.dtype] = None) -> "WeightOnlyLinear":
        layer = cls(weight.in_features, weight.shape[0], bias is not None, weight.bits, weight.group_size,
                    weight.symmetric, device=weight.codes.device, dtype=dtype)
        layer.set_quantized(weight)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(layer.compute_dtype).clone(), requires_grad=False)
        return layer

    # -- the weight ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_quantized(self, weight: QuantizedWeight) -> None:
        expected = (self.out_features, self.in_features, self.bits, self.group_size, self.symmetric)
        given = (weight.shape[0], weight.in_features, weight.bits, weight.group_size, weight.symmetric)
        if given != expected:
            raise ValueError(f"a quantized weight (out, in, bits, group_size, symmetric) = {given} does not fit "
                             f"this layer's {expected}")
        codes = weight.codes.to(self.qweight.device)
        self.qweight.copy_(pack_int4(codes) if self.bits == 4 else codes)
        self.scales.copy_(weight.scales)
        if self.zeros is not None:
            self.zeros.copy_(weight.zeros)
        self._kernel_stale = True

    def quantized(self, rows: Optional[torch.Tensor] = None) -> QuantizedWeight:
        """The weight as a QuantizedWeight; with `rows` (1-D indices) only those output rows, gathered before the
        int4 codes are unpacked (a head's few top rows must not unpack the whole matrix)."""
        if rows is None:
            codes = unpack_int4(self.qweight) if self.bits == 4 else self.qweight
            return QuantizedWeight(codes, self.scales, self.zeros, self.bits, self.group_size, self.in_features)
        packed = self.qweight[rows]
        return QuantizedWeight(unpack_int4(packed) if self.bits == 4 else packed, self.scales[rows],
                               None if self.zeros is None else self.zeros[rows], self.bits, self.group_size,
                               self.in_features)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return self.quantized().dequantize(dtype or self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        # Assigning a full weight (a LoRA merge, or tie_weights) quantizes it again, with this layer's settings.
        self.set_quantized(quantize_weight(value, self.bits, self.group_size, self.symmetric))

    # -- the product --------------------------------------------------------------------------------------
    def _kernel_weight(self):
        # A flag, not a comparison of data pointers: torch.compile traces a flag (and it costs nothing per call).
        if self._kernel_stale:
            self._kernel = pack_for_kernel(self.quantized())
            self._kernel_stale = False
        return self._kernel

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._kernel_stale = True

    def prepare(self) -> None:
        """Build the kernel layout now rather than on the first forward."""
        self._kernel_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self._path(x)
        if path == "reference":
            y = reference_linear(x, self.quantized())
        else:
            kernel = self._kernel_weight()
            y = int8_activation_linear(x, kernel) if path == "int8_activations" else \
                kernel_linear(x, kernel, self.group_size)
            if self.exact_top:
                y = self._recompute_top(x, y)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _recompute_top(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The `exact_top` largest outputs of each row again, in x's dtype from the dequantized rows.

        The kernels take and give bf16 (8 significant bits): logits of 20-30 come out up to ~0.06 off, which is
        enough to swap two nearly tied tokens. A head recomputes its top candidates exactly, so greedy decoding
        picks what the dequantized weights pick (the tail, which sampling rarely reaches, keeps the kernel's).
        """
        top = y.topk(min(self.exact_top, self.out_features), dim=-1).indices  # [..., k]
        weight = self.quantized(top.reshape(-1)).dequantize(x.dtype).view(*top.shape, self.in_features)
        exact = (weight @ x.unsqueeze(-1)).squeeze(-1)
        return y.scatter(-1, top, exact)

    def _path(self, x: torch.Tensor) -> str:
        """"kernel" (weight-only), "int8_activations" or "reference" (dequantized weight; the only one with a
        backward). The weight-only kernels are matrix-vector products, their time linear in the rows: past a few
        dozen rows (a prefill) one dequantization and a float matrix product are faster. With int8 activations
        on, an int8 per-row weight takes them from a few rows on, prefills included."""
        if not self.use_kernel or (x.requires_grad and torch.is_grad_enabled()):
            return "reference"
        rows = x.numel() // x.shape[-1]
        if (self.int8_activations and self.bits == 8 and self.group_size == self.in_features
                and rows >= INT8_ACTIVATION_MIN_ROWS and has_int8_matmul(x.device)):
            kernel = self._kernel_weight()
            if kernel is not None:
                return "int8_activations"
        if rows > KERNEL_MAX_ROWS or self._kernel_weight() is None:
            return "reference"
        return "kernel"

    def storage_bytes(self) -> int:
        """Bytes the weight takes as stored (codes, scales and zeros; the bias is not counted)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def _apply(self, fn, recurse=True):
        # Codes stay integers and scales float32 whatever dtype the model is moved to; compute_dtype follows it.
        kept = {name: self._buffers.pop(name) for name in ("scales", "zeros") if name in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            device = self.qweight.device
            for name, tensor in kept.items():
                self._buffers[name] = None if tensor is None else tensor.to(device)
        probe = fn(torch.zeros((), dtype=self.compute_dtype, device=device))
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.compute_dtype = probe.dtype
        self._kernel_stale = True
        return self

    def extra_repr(self) -> str:
        kind = f"int{self.bits}" + ("" if self.symmetric else " asymmetric")
        group = "per row" if self.group_size == self.in_features else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{kind}, {group}")
