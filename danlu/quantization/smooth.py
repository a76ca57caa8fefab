"""SmoothQuant (Xiao et al., 2023): move the activations' outliers into the weights before int8 activations are used.

A linear layer's product is unchanged when an input channel j of the activations is divided by s_j and the weight's
column j multiplied by it. Choosing s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (alpha 0.5: the paper's default)
evens out the channels' ranges on both sides, so one int8 scale per activation row loses less; alpha "auto"
picks it per group of layers from a grid by the int8 product's error on calibration rows. The division is
folded into whatever makes those activations, so the model stays a plain model with the same function:
* q/k/v (and gate/up): their input is the RMSNorm before them: its weight (and a LayerNorm's bias) is divided;
* down_proj: its input is act(gate) * up: up_proj's rows (and bias) are divided;
* o_proj: its input is the heads' weighted values: v_proj's rows are divided, one scale per key/value channel
  (the query heads that share a key/value head share it), o_proj's columns multiplied.
The output head is left alone (tied to the embedding in the small models; quantize() gives it its own copy).

max|X_j| and the rows come from calibration text run through the float model (`activation_statistics`).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CALIBRATION_TOKENS = 4096


def calibration_ids(tokenizer, texts: Sequence[str], tokens: int = CALIBRATION_TOKENS) -> list[int]:
    """`tokens` calibration tokens from `texts`: each text as a user turn of the model's chat template when it has
    one (a chat model's inputs carry the template's control tokens, whose activations are among the largest: plain
    text misses them, and a model smoothed on it answers chat prompts badly once quantized), else the texts
    joined by blank lines."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"][:tokens]
    from danlu.tokenization.chat import encode_chat

    ids: list[int] = []
    for text in texts:
        if len(ids) >= tokens:
            break
        ids += encode_chat(tokenizer, [{"role": "user", "content": text}])
    return ids[:tokens]


def calibration_batches(ids: Sequence[int], length: int = 512) -> list[list[list[int]]]:
    """Calibration tokens as one-row batches of `length` (the last, shorter piece dropped)."""
    ids = list(ids)
    batches = [[ids[start:start + length]] for start in range(0, len(ids) - length + 1, length)]
    if not batches:
        raise ValueError(f"the calibration text has {len(ids)} tokens; at least {length} are needed")
    return batches


@torch.no_grad()
def activation_statistics(model: nn.Module, batches: Iterable[Sequence[Sequence[int]]], sample_rows: int = 256
                          ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Of every nn.Linear in the decoder layers, over the calibration token batches: the largest |input| per channel,
    and the first `sample_rows` input rows (what alpha="auto" measures the quantization error on)."""
    maxima: dict[str, torch.Tensor] = {}
    samples: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, inputs, output):
            rows = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            x = rows.abs().amax(dim=0)
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x
            kept = samples.get(name, rows[:0])
            samples[name] = torch.cat([kept, rows[:sample_rows - len(kept)]])
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and ".layers." in name]
    device = next(model.parameters()).device
    try:
        for batch in batches:
            model(torch.tensor(batch, device=device))
    finally:
        for handle in handles:
            handle.remove()
    if not maxima:
        raise ValueError("no linear layer of the decoder saw the calibration text")
    return maxima, samples


def smoothing_scales(activation_max: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float,
                     weight_max: Optional[torch.Tensor] = None) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), W_j the column j of every weight fed by X (or `weight_max`)."""
    if weight_max is None:
        weight_max = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    scales = activation_max.clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1 - alpha)
    return scales.clamp(min=1e-5)


@torch.no_grad()
def smooth(model: nn.Module, maxima: dict[str, torch.Tensor], alpha: Union[float, str] = "auto",
           samples: Optional[dict[str, torch.Tensor]] = None) -> dict[str, float]:
    """Smooth every decoder layer of `model` in place (the same function, its float weights changed). alpha: one
    value for all, or "auto": for each group of layers sharing an input, the alpha of ALPHA_GRID whose int8 rows
    times int8 weights come closest to the float product on the calibration `samples` (as SmoothQuant's
    implementations tune it). Returns the alpha chosen for each group (named by its first layer)."""
    if alpha == "auto" and samples is None:
        raise ValueError('alpha="auto" needs the calibration samples (activation_statistics)')
    if alpha != "auto" and not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise ValueError(f'alpha must be in [0, 1] or "auto", got {alpha!r}')
    config = model.config
    if not config.causal:
        raise ValueError("smoothing folds scales into the norms before the layers: a pre-norm decoder is needed")
    kv, head_dim = config.num_key_value_heads, config.head_dim
    group = config.num_attention_heads // kv
    chosen = {}

    def per_query_head(compact: torch.Tensor) -> torch.Tensor:
        """One scale per value channel, repeated for the query heads that share its key/value head."""
        return compact.view(kv, 1, head_dim).expand(-1, group, -1).reshape(-1)

    def choose(name: str, weights: list[torch.Tensor], activation_max: torch.Tensor, weight_max=None, expand=None):
        expand = expand or (lambda scales: scales)
        if alpha != "auto":
            chosen[name] = alpha
            return smoothing_scales(activation_max, weights, alpha, weight_max)
        exact = [samples[name] @ w.float().t() for w in weights]  # what every candidate is measured against
        best = None
        for candidate in ALPHA_GRID:
            scales = smoothing_scales(activation_max, weights, candidate, weight_max)
            error = _int8_error(samples[name], weights, exact, expand(scales))
            if best is None or error < best[0]:
                best = (error, candidate, scales)
        chosen[name] = best[1]
        return best[2]

    for index, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{index}."
        attention, mlp = layer.self_attn, layer.mlp
        qkv = [attention.q_proj, attention.k_proj, attention.v_proj]
        scales = choose(prefix + "self_attn.q_proj", [m.weight for m in qkv], maxima[prefix + "self_attn.q_proj"])
        _fold(scales, divide=[layer.input_layernorm], multiply=qkv)
        gated = getattr(mlp, "gated", False)
        first = "mlp.gate_proj" if gated else "mlp.up_proj"
        feeding = [mlp.gate_proj, mlp.up_proj] if gated else [mlp.up_proj]
        scales = choose(prefix + first, [m.weight for m in feeding], maxima[prefix + first])
        _fold(scales, divide=[layer.post_attention_layernorm], multiply=feeding)
        if gated:  # act(gate) * up: dividing up's rows divides down's input channels
            scales = choose(prefix + "mlp.down_proj", [mlp.down_proj.weight], maxima[prefix + "mlp.down_proj"])
            _fold(scales, divide_rows=mlp.up_proj, multiply=[mlp.down_proj])
        # o_proj's input channel (query head h, dim d) is value channel (h // group, d): one scale per value channel
        o_columns = attention.o_proj.weight.abs().amax(dim=0).float().view(kv, group, head_dim)
        scales = choose(prefix + "self_attn.o_proj", [attention.o_proj.weight],
                        maxima[prefix + "self_attn.o_proj"].view(kv, group, head_dim).amax(dim=1).reshape(-1),
                        weight_max=o_columns.amax(dim=1).reshape(-1), expand=per_query_head)
        _fold(scales, divide_rows=attention.v_proj)
        attention.o_proj.weight.mul_(per_query_head(scales).to(attention.o_proj.weight.dtype))
    return chosen


def _int8_error(sample: torch.Tensor, weights: list[torch.Tensor], exact: list[torch.Tensor],
                scales: torch.Tensor) -> float:
    """How far int8 rows of sample / scales times int8 rows of weight * scales land from the float products."""
    x = _int8_rows(sample / scales)
    return sum(float((x @ _int8_rows(w.float() * scales).t() - product).pow(2).sum())
               for w, product in zip(weights, exact))


def _int8_rows(t: torch.Tensor) -> torch.Tensor:
    """t rounded to int8 per row, symmetric (the weight and activation scheme), back in float."""
    scale = t.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(t / scale) * scale


def _fold(scales: torch.Tensor, divide: Sequence[nn.Module] = (), divide_rows: Optional[nn.Linear] = None,
          multiply: Sequence[nn.Linear] = ()) -> None:
    """Divide the norms' weights (and biases), or a linear's output rows, by the scales; multiply the linears'
    input columns by them."""
    for norm in divide:
        norm.weight.div_(scales.to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(scales.to(norm.bias.dtype))
    if divide_rows is not None:
        divide_rows.weight.div_(scales[:, None].to(divide_rows.weight.dtype))
        if divide_rows.bias is not None:
            divide_rows.bias.div_(scales.to(divide_rows.bias.dtype))
    for linear in multiply:
        linear.weight.mul_(scales.to(linear.weight.dtype))
