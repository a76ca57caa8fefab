"""The transformer. One class for every family; the family is a ModelConfig.

Module names match Hugging Face's Llama (model.layers.N.self_attn.q_proj, mlp.gate_proj, lm_head, ...),
so Llama, Qwen2, Qwen3, Mistral and SmolLM2 checkpoints load without renaming.

An encoder (BERT) is the same classes with other values: bidirectional attention over the non-padding keys,
learned position and token type embeddings and a norm on their sum (`Decoder.embed`), post-norm blocks
(`Block.sublayer`), exact GELU, and no final norm nor lm_head: forward returns the last hidden states.
danlu.checkpoints.hf maps BERT's tensor names onto these.

The model is ready for parallelism applied from outside:
* tensor parallel: attention takes its head counts from the tensors, so a shard holding a slice of the
  q/k/v/gate/up rows and the matching slice of the o/down columns (danlu.models.roles) runs unchanged;
* pipeline parallel: a stage is the same class built with a range of layers and without the embedding
  and/or the final norm and head (`pipeline_stage`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

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


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim], however many heads x holds."""
    batch, seq, _ = x.shape
    return x.view(batch, seq, -1, head_dim).transpose(1, 2)


@dataclass
class Intermediates:
    """What a forward pass records beside its output when handed one (distillation reads it).

    hidden_states: the embedding output, then each block's output (the residual stream, before the final norm;
    a post-norm block's output is already normalised, as Hugging Face's BERT hidden states are).
    attention_scores: per block, q.k / sqrt(head_dim) [batch, heads, queries, keys] before masking and softmax,
    recorded only when `attention_scores` is asked for; that takes the explicit attention path instead of SDPA.
    """

    attention_scores: bool = False
    hidden_states: list = field(default_factory=list)
    scores: list = field(default_factory=list)


def explicit_attention(q, k, v, mask: Optional[torch.Tensor], is_causal: bool):
    """softmax(q.k / sqrt(d) + mask) v written out, so that the scores can be kept: (output, scores)."""
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each key/value head serves a group of query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if is_causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril(scores.shape[-1] - scores.shape[-2])
    masked = scores if mask is None else scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(masked.float(), dim=-1).to(v.dtype)
    return weights @ v, scores


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.causal = config.causal
        q_size = config.num_attention_heads * config.head_dim
        kv_size = config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.o_bias)
        # Qwen3: each query and key head is normalised over head_dim before RoPE.
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, mask: Optional[torch.Tensor], kv_cache=None,
                intermediates: Optional[Intermediates] = None) -> torch.Tensor:
        """cos and sin are None when positions are learned embeddings (added once, at the input)."""
        batch, seq, _ = x.shape
        q = self.q_norm(split_heads(self.q_proj(x), self.head_dim))
        k = self.k_norm(split_heads(self.k_proj(x), self.head_dim))
        v = split_heads(self.v_proj(x), self.head_dim)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        # mask None means plain causal attention (a decoder) or attention to every key (an encoder).
        is_causal = self.causal and mask is None and seq > 1
        if intermediates is not None and intermediates.attention_scores:
            out, scores = explicit_attention(q, k, v, mask, is_causal)
            intermediates.scores.append(scores)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                 enable_gqa=q.shape[1] != k.shape[1])
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        self.gelu_approximation = "none" if config.mlp == "gelu_exact" else "tanh"
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.gelu_approximation))


class Block(nn.Module):
    """Attention then MLP, each a residual sublayer with its own norm.

    input_layernorm is the attention sublayer's norm and post_attention_layernorm the MLP's (Llama's names):
    pre-norm applies each before its sublayer, post-norm (BERT) after the residual sum.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # the KV cache slot, and the block's name in Layers
        self.norm_position = config.norm_position
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, kv_cache=None, intermediates: Optional[Intermediates] = None):
        x = self.sublayer(x, lambda h: self.self_attn(h, cos, sin, mask, kv_cache, intermediates),
                          self.input_layernorm)
        return self.sublayer(x, self.mlp, self.post_attention_layernorm)

    def sublayer(self, x, f, norm):
        if self.norm_position == "pre":
            return x + f(norm(x))  # Llama
        return norm(x + f(x))  # BERT


class Layers(nn.Module):
    """The blocks, each registered under its layer index in the whole model (`model.layers.5.`).

    So a pipeline stage holding layers 4-7 keeps the parameter names and KV cache slots of the whole
    model. Iterating yields the blocks in order; len() and indexing by position work as on a ModuleList.
    """

    def __init__(self, blocks: Iterable[Block]):
        super().__init__()
        for block in blocks:
            self.add_module(str(block.layer_idx), block)

    def __iter__(self) -> Iterator[Block]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, position: int) -> Block:
        return list(self._modules.values())[position]


class Decoder(nn.Module):
    """The body (Hugging Face's `model.` prefix): embeddings, blocks and final norm.

    In a pipeline stage the embedding and the norm may be absent (None). An encoder (BERT) adds learned
    position and token type embeddings and a norm on the summed embeddings; it has no final norm.
    """

    def __init__(self, config: ModelConfig, layers: range, embed: bool = True, norm: bool = True):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if embed else None
        self.embed_positions = self.embed_token_types = self.embed_norm = None
        if embed and config.position_embedding_type == "absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        if embed and config.type_vocab_size:
            self.embed_token_types = nn.Embedding(config.type_vocab_size, config.hidden_size)
        if embed and config.embedding_norm:
            self.embed_norm = make_norm(config)
        self.layers = Layers(Block(config, i) for i in layers)
        self.norm = make_norm(config) if norm else None

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
              token_type_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """Token embeddings, plus (BERT) token type and position embeddings, then the embedding norm."""
        x = self.embed_tokens(input_ids)
        if self.embed_token_types is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.embed_token_types(token_type_ids)
        if self.embed_positions is not None:
            x = x + self.embed_positions(position_ids)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return x


class Pooler(nn.Module):
    """BERT's pooler, tanh(dense(hidden state of the first token)): kept so that BERT checkpoints load and are
    written whole. The forward pass never calls it; sentence embeddings mean-pool (danlu.models.pooling)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class Transformer(nn.Module):
    """The whole model, or one pipeline stage of it.

    layers: which layer indices this module holds (default: all).
    embed=False: no token embedding; forward takes hidden states [batch, seq, hidden] instead of token ids.
    head=False: no final norm and no lm_head; forward returns the hidden states after the last layer.
    An encoder (config.causal False) never has an lm_head and, being post-norm, no final norm: forward
    returns its last hidden states; its optional pooler rides with the head.
    """

    def __init__(self, config: ModelConfig, layers: Optional[range] = None, embed: bool = True,
                 head: bool = True):
        super().__init__()
        self.config = config
        layers = range(config.num_hidden_layers) if layers is None else layers
        check_layer_range(layers, config.num_hidden_layers)
        self.model = Decoder(config, layers, embed=embed, norm=head and config.norm_position == "pre")
        self.lm_head = None
        if head and config.has_lm_head:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.pooler = Pooler(config) if head and config.add_pooling_layer else None
        self.tie_weights()
        self._inv_freq: Optional[torch.Tensor] = None

    def tie_weights(self) -> None:
        # A stage with the head but not the embedding keeps its own copy of the tied matrix.
        if self.config.tie_word_embeddings and self.model.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Hugging Face's initialisation, in place: linear and embedding weights from
        normal(0, config.initializer_range), biases zero, norm weights one; the tied head stays tied.

        Call it before transforms (LoRA, quantization) that add modules of their own.
        """
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                nn.init.zeros_(module.bias)
        self.tie_weights()  # moving a model off the meta device (to_empty) unties it

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
        intermediates: Optional[Intermediates] = None,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab] (or [batch, 1, vocab] with last_only); an encoder's last hidden states.

        input_ids are token ids [batch, seq], or hidden states [batch, seq, hidden] for a stage built
        without the embedding; a stage without the head returns hidden states.
        attention_mask [batch, past + seq] marks real tokens with 1 and padding with 0 (left padding for a
        decoder; an encoder masks the padded keys wherever they are, BERT's tokenizers pad on the right).
        A 4-D boolean attention_mask [batch, 1, seq, keys] (True = may attend) is taken as it is, with the
        position_ids that must come with it: a static KV cache's caller (danlu.generation.decoders) builds it.
        document_ids [batch, seq] (training on packed rows): tokens attend only within their own document,
        whose positions start again at 0; id 0 is padding.
        intermediates: filled with the hidden states (and attention scores if it asks) on the way.
        token_type_ids [batch, seq] (models with type_vocab_size, BERT's segments): absent means all 0.
        """
        seq = input_ids.shape[1]
        mask, position_ids = self._mask_and_positions(attention_mask, position_ids, document_ids, kv_cache, seq,
                                                      input_ids.device)
        if self.model.embed_tokens is not None:
            x = self.model.embed(input_ids, position_ids, token_type_ids)
        else:
            x = input_ids
        cos, sin = self._rope(position_ids, x)
        if intermediates is not None:
            intermediates.hidden_states.append(x)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, kv_cache, intermediates)
            if intermediates is not None:
                intermediates.hidden_states.append(x)
        if kv_cache is not None:
            kv_cache.advance(seq)
        if self.model.norm is not None:
            x = self.model.norm(x)
        if return_hidden or self.lm_head is None:
            return x
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)

    def _rope(self, position_ids, x) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if self.config.position_embedding_type != "rope":
            return None, None  # learned positions were added to the embeddings
        return rope_cos_sin(self.rope_inverse_frequencies(x.device), position_ids, x.dtype)

    def _mask_and_positions(self, attention_mask, position_ids, document_ids, kv_cache, seq: int, device):
        if attention_mask is not None and attention_mask.dim() == 4:
            # Ready-made (a static cache's caller builds it over the cache's columns): used as it is.
            if position_ids is None:
                raise ValueError("a 4-D attention_mask [batch, 1, queries, keys] comes with its position_ids")
            return attention_mask, position_ids
        past = kv_cache.length if kv_cache is not None else 0
        if not self.config.causal:
            if document_ids is not None:
                raise ValueError("document_ids (packed rows) need a causal model; this one is an encoder")
            if position_ids is None:  # BERT: 0..seq-1 whatever the padding (on the right)
                position_ids = default_position_ids(None, past, seq, device)
            return encoder_attention_mask(attention_mask), position_ids
        if document_ids is not None:
            return (packed_attention_mask(document_ids, self.config.sliding_window),
                    packed_position_ids(document_ids))
        mask = attention_bias_mask(attention_mask, past, seq, self.config.sliding_window, device)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, past, seq, device)
        return mask, position_ids


def check_layer_range(layers: range, num_layers: int) -> None:
    if not isinstance(layers, range) or layers.step != 1 or not 0 <= layers.start <= layers.stop <= num_layers:
        raise ValueError(f"layers must be a range of consecutive layer indices within 0..{num_layers}, "
                         f"got {layers!r}")


def pipeline_stage(config: ModelConfig, layers: range) -> Transformer:
    """The pipeline stage holding `layers`: with the embedding if it starts at layer 0, with the final
    norm and lm_head if it ends at the last layer. Chained, the stages compute the whole model."""
    return Transformer(config, layers, embed=layers.start == 0, head=layers.stop == config.num_hidden_layers)


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
    return causal_mask(torch.arange(past, total, device=device), total, sliding_window,
                       attention_mask[:, :total].bool() if has_padding else None)


def causal_mask(queries: torch.Tensor, keys: int, sliding_window, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Boolean mask [batch or 1, 1, len(queries), keys] (True = may attend): each query (a key position) sees the
    keys at or before it, within the sliding window, and only the `valid` ones ([batch, keys], False on padding;
    None: all); a query on padding would then see no key at all (NaN in softmax), so it sees itself."""
    query_idx = queries[:, None]
    key_idx = torch.arange(keys, device=queries.device)[None, :]
    allowed = key_idx <= query_idx
    if sliding_window is not None:
        allowed = allowed & (query_idx - key_idx < sliding_window)
    allowed = allowed[None, None]
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
        allowed = allowed | (query_idx == key_idx)[None, None]
    return allowed


def encoder_attention_mask(attention_mask) -> Optional[torch.Tensor]:
    """Boolean mask [batch, 1, 1, keys] (True = may attend) hiding the padded keys from every query, or None
    when nothing is padded. As in BERT, a padding query still attends to the real tokens."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    allowed = attention_mask[:, None, None, :].bool()
    # A row of padding only would see no key at all (NaN in softmax); let it see them all.
    return allowed | ~allowed.any(dim=-1, keepdim=True)


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
    """The model's structure with no storage (the loaders then assign the checkpoint's tensors)."""
    with torch.device("meta"), _initialisers_skipped():
        return Transformer(config)


@contextmanager
def _initialisers_skipped():
    # Modules run their initialisers even on the meta device, where the values are never read; the first
    # random one there imports torch._dynamo (1.5 s in a fresh process). transformers' no_init_weights, likewise.
    names = ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_", "trunc_normal_")
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)
