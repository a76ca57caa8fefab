"""ModelConfig: the one description of a transformer; every family is a set of values here.

Field names follow Hugging Face's config.json so that the mapping to and from it stays thin. The defaults
are a Llama decoder; an encoder such as BERT is other values of the same fields: `causal=False`,
`position_embedding_type="absolute"`, `type_vocab_size`, `embedding_norm`, `norm_position="post"`,
`mlp="gelu_exact"`, biases everywhere and LayerNorm.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

NORMS = ("rmsnorm", "layernorm")
# swiglu: down(silu(gate(x)) * up(x)); gelu: down(gelu(up(x))) with the tanh approximation (Hugging Face's
# gelu_pytorch_tanh); gelu_exact: the same with the exact erf GELU (Hugging Face's "gelu", BERT's).
MLPS = ("swiglu", "gelu", "gelu_exact")
ROPE_TYPES = ("default", "linear", "llama3")
# rope: rotary embeddings on q and k in every block; absolute: a learned table added to the token
# embeddings (BERT's "absolute").
POSITION_EMBEDDING_TYPES = ("rope", "absolute")
# pre: x + f(norm(x)) and a final norm (Llama); post: norm(x + f(x)) and no final norm (BERT).
NORM_POSITIONS = ("pre", "post")
ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "bert", "custom")


class ConfigError(ValueError):
    """A model configuration value is missing or not one of the allowed values."""


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    num_key_value_heads: Optional[int] = None  # None -> equal to num_attention_heads (MHA); 1 -> MQA
    head_dim: Optional[int] = None  # None -> hidden_size // num_attention_heads
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    mlp: str = "swiglu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on each query and key head, before RoPE (Qwen3)
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02  # std of the normal initialisation of linear and embedding weights
    # The encoder switches (BERT). The defaults keep every decoder as it was.
    causal: bool = True  # False: every token attends to every other (padding excepted); no lm_head
    position_embedding_type: str = "rope"  # see POSITION_EMBEDDING_TYPES
    type_vocab_size: int = 0  # token type (segment) embeddings added to the token embeddings; 0 = none
    embedding_norm: bool = False  # a norm on the summed embeddings (BERT's embeddings.LayerNorm)
    norm_position: str = "pre"  # see NORM_POSITIONS
    add_pooling_layer: bool = False  # BERT's pooler: tanh(dense(first token)), kept so checkpoints round-trip
    architecture: str = "llama"  # which Hugging Face family export writes
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None  # int or list of ints
    pad_token_id: Optional[int] = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.num_attention_heads and self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim explicitly")
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        _check_choice("norm", self.norm, NORMS)
        _check_choice("mlp", self.mlp, MLPS)
        _check_choice("architecture", self.architecture, ARCHITECTURES)
        _check_choice("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDING_TYPES)
        _check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        for name in ("causal", "embedding_norm", "add_pooling_layer"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.type_vocab_size, int) or isinstance(self.type_vocab_size, bool) \
                or self.type_vocab_size < 0:
            raise ConfigError(f"type_vocab_size must be a non-negative integer (0 = none), "
                              f"got {self.type_vocab_size!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.initializer_range <= 0:
            raise ConfigError(f"initializer_range must be positive, got {self.initializer_range}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if self.rope_scaling is not None:
            _validate_rope_scaling(self.rope_scaling)
            if self.position_embedding_type != "rope":
                raise ConfigError(f"rope_scaling needs position_embedding_type 'rope', "
                                  f"got {self.position_embedding_type!r}")
        if self.sliding_window is not None and not self.causal:
            raise ConfigError("sliding_window is for causal models only (causal=False here)")

    @property
    def has_lm_head(self) -> bool:
        """A decoder ends in the language-model head; an encoder (causal=False, like Hugging Face's BertModel)
        returns its last hidden states."""
        return self.causal

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)



def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _validate_rope_scaling(scaling: dict) -> None:
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be a dict or None, got {scaling!r}")
    rope_type = scaling.get("rope_type", "default")
    _check_choice("rope_scaling.rope_type", rope_type, ROPE_TYPES)
    if rope_type in ("linear", "llama3"):
        factor = scaling.get("factor")
        if not isinstance(factor, (int, float)) or factor < 1:
            raise ConfigError(f"rope_scaling.factor must be a number >= 1, got {factor!r}")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in scaling:
                raise ConfigError(f"rope_scaling of type llama3 needs {key!r}")
