"""The decoder-only transformer. One class for every family; the family is a ModelConfig.

Module names match Hugging Face's Llama (model.layers.N.self_attn.q_proj, mlp.gate_proj, lm_head, ...),
so Llama, Qwen2, Mistral and SmolLM2 checkpoints load without renaming.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from danlu.models.config import ModelConfig
from danlu.models.rope import apply_rope, inverse_frequencies, rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=config.o_bias)

    def forward(self, x, cos, sin, mask: Optional[torch.Tensor], kv_cache=None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        # mask None means plain causal attention over keys that all precede or equal the queries.
        is_causal = mask is None and seq > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The body: embeddings, blocks and final norm (Hugging Face's `model.` prefix)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._inv_freq: Optional[torch.Tensor] = None

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope_inverse_frequencies(self, device: torch.device) -> torch.Tensor:
        # Kept off the module's buffers so that meta-device construction and loading never touch it.
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = inverse_frequencies(self.config, device)
        return self._inv_freq

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        kv_cache=None,
        last_only: bool = False,
        return_hidden: bool = False,
        document_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab] (or [batch, 1, vocab] with last_only).

        attention_mask [batch, past + seq] marks real tokens with 1 and padding with 0 (left padding).
        document_ids [batch, seq] (training on packed rows): tokens attend only within their own document,
        whose positions start again at 0; id 0 is padding.
        """
        batch, seq = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if document_ids is not None:
            position_ids = packed_position_ids(document_ids)
            mask = packed_attention_mask(document_ids, self.config.sliding_window)
        else:
            mask = attention_bias_mask(attention_mask, past, seq, self.config.sliding_window, input_ids.device)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, past, seq, input_ids.device)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.rope_inverse_frequencies(x.device), position_ids, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(seq)
        x = self.model.norm(x)
        if return_hidden:
            return x
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)


def default_position_ids(attention_mask, past: int, seq: int, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.arange(past, past + seq, device=device)[None]
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, past:past + seq]


def attention_bias_mask(attention_mask, past: int, seq: int, sliding_window, device) -> Optional[torch.Tensor]:
    """Boolean mask [batch or 1, 1, seq, past + seq] (True = may attend), or None for plain causal.

    None is returned whenever SDPA's own causal path is exact: no padding, no window in reach, and
    either a prefill with no past or a single decoded token (which sees every key).
    """
    total = past + seq
    window_bites = sliding_window is not None and total > sliding_window
    has_padding = attention_mask is not None and not bool(attention_mask.all())
    if not window_bites and not has_padding and (past == 0 or seq == 1):
        return None
    query_idx = torch.arange(past, total, device=device)[:, None]
    key_idx = torch.arange(total, device=device)[None, :]
    allowed = key_idx <= query_idx
    if sliding_window is not None:
        allowed = allowed & (query_idx - key_idx < sliding_window)
    allowed = allowed[None, None]
    if has_padding:
        allowed = allowed & attention_mask[:, None, None, :total].bool()
        # A padding query would see no key at all (NaN in softmax); let it see itself.
        allowed = allowed | (query_idx == key_idx)[None, None]
    return allowed


def packed_position_ids(document_ids: torch.Tensor) -> torch.Tensor:
    batch, seq = document_ids.shape
    index = torch.arange(seq, device=document_ids.device).expand(batch, seq)
    previous = torch.nn.functional.pad(document_ids[:, :-1], (1, 0), value=-1)
    start = torch.where(document_ids != previous, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - start


def packed_attention_mask(document_ids: torch.Tensor, sliding_window) -> torch.Tensor:
    """[batch, 1, seq, seq]: causal, within one document, never onto padding (id 0)."""
    seq = document_ids.shape[1]
    index = torch.arange(seq, device=document_ids.device)
    allowed = (index[None, :] <= index[:, None])[None]
    if sliding_window is not None:
        allowed = allowed & (index[:, None] - index[None, :] < sliding_window)[None]
    same = document_ids[:, :, None] == document_ids[:, None, :]
    allowed = allowed & same & (document_ids[:, None, :] != 0)
    return (allowed | torch.eye(seq, dtype=torch.bool, device=document_ids.device)[None])[:, None]


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def build_meta_model(config: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(config)
