"""Transformer building blocks shared by the scLDM VAE and the latent DiT.

Every block is pre-LayerNorm with residual connections. The VAE's attention goes through transformers' attention
interface: `config._attn_implementation` (`attn_implementation="eager"` or `"sdpa"` at `from_pretrained` /
`from_config`, or `model.set_attn_implementation(...)`) picks the function from `ATTENTION_FUNCTIONS`. Its `"sdpa"`
is transformers' `sdpa_attention_forward`, except over few keys (`FEW_KEYS`), where it is the eager
matmul-softmax-matmul (same numbers, faster on CPU; the decoder read-out has one key per latent token).
The VAE's blocks are transformers `GradientCheckpointingLayer`s, so `SCVAEModel.gradient_checkpointing_enable()`
recomputes them in the backward pass.
A `key_padding_mask` is a BoolTensor `[B, K]` where True marks a real token and False a padding token; padding keys get
exactly zero attention weight, so they have no influence on the output.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import AttentionInterface

from ..errors import ConfigurationError

# Up to this many keys, the "sdpa" attention is the eager matmul-softmax-matmul (see `few_keys_sdpa_attention_forward`).
FEW_KEYS = 32


def swiglu_intermediate_size(hidden_size: int, multiple_of: int = 8) -> int:
    """LLaMA-style SwiGLU width: 2/3 of a 4x MLP, rounded up to a multiple of `multiple_of`."""
    size = int(2 * 4 * hidden_size / 3)
    return multiple_of * ((size + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """Gated MLP `down(silu(gate(x)) * up(x))`, `[..., H] -> [..., H]`."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.BoolTensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matmul-softmax-matmul attention with transformers' interface: `query [B, heads, Q, d]`, `key, value
    [B, heads, K, d]`, `attention_mask [B, 1, 1, K]` (True = attend) -> (`[B, Q, heads, d]`, weights
    `[B, heads, Q, K]`)."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    weights = F.dropout(torch.softmax(scores, dim=-1), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2), weights


def few_keys_sdpa_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, *args, **kwargs):
    """transformers' `sdpa_attention_forward`, or `eager_attention_forward` over at most `FEW_KEYS` keys (same
    numbers; the fused kernel costs more than the attention there, e.g. the decoder read-out's few latent keys)."""
    attention = eager_attention_forward if key.shape[-2] <= FEW_KEYS else sdpa_attention_forward
    return attention(module, query, key, *args, **kwargs)


# The VAE's attention functions: transformers' (flash, flex, user-registered ones), with "sdpa" overridden locally
# as `AttentionInterface` provides for.
ATTENTION_FUNCTIONS = AttentionInterface()
ATTENTION_FUNCTIONS["sdpa"] = few_keys_sdpa_attention_forward


class Attention(nn.Module):
    """Multi-head attention of queries `[B, Q, H]` over a context `[B, K, H]` (self-attention when no context),
    computed by `config._attn_implementation` (see the module docstring)."""

    def __init__(self, config: PreTrainedConfig, num_heads: int):
        super().__init__()
        hidden_size, bias = config.hidden_size, config.attention_bias
        if hidden_size % num_heads != 0:
            raise ConfigurationError(
                f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}; choose a head count that "
                "divides the hidden size."
            )
        self.config = config
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=bias)

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        """`[..., N, H] -> [..., heads, N, H / heads]` (`[N, H]` gives `[heads, N, H / heads]`)."""
        return states.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def project_queries(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Queries `[..., Q, H] -> [..., heads, Q, H / heads]`; a `[Q, H]` input is shared by every cell."""
        return self._split_heads(self.q_proj(hidden_states))

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Context `[B, K, H]` -> (keys, values), each `[B, heads, K, H / heads]`."""
        return self._split_heads(self.k_proj(context)), self._split_heads(self.v_proj(context))

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.BoolTensor | None = None,
    ) -> torch.Tensor:
        """Projected `query [B or 1, heads, Q, d]` or `[heads, Q, d]` over `key, value [B, heads, K, d]` -> `[B, Q, H]`,
        by the attention function of `config._attn_implementation`."""
        attention_interface = ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attention_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        query = query.expand(key.shape[0], *query.shape[-3:])
        attended, _ = attention_interface(self, query, key, value, attention_mask, scaling=self.scaling, dropout=0.0)
        return self.o_proj(attended.flatten(-2))

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor | None = None,
        key_padding_mask: torch.BoolTensor | None = None,
    ) -> torch.Tensor:
        """Queries from `hidden_states` `[B, Q, H]`, keys/values from `context` `[B, K, H]` -> `[B, Q, H]`."""
        context = hidden_states if context is None else context
        key, value = self.project_context(context)
        return self.attend(self.project_queries(hidden_states), key, value, key_padding_mask=key_padding_mask)


class SelfAttentionBlock(GradientCheckpointingLayer):
    """Pre-LN transformer block: `x + attn(ln(x))`, then `x + swiglu(ln(x))`. `[B, N, H] -> [B, N, H]`.

    `config` gives `hidden_size`, `intermediate_size`, `layer_norm_eps`, `attention_bias` and `_attn_implementation`.
    """

    def __init__(self, config: PreTrainedConfig, num_heads: int):
        super().__init__()
        hidden_size, eps = config.hidden_size, config.layer_norm_eps
        self.attention_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.attention = Attention(config, num_heads)
        self.mlp_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = SwiGLU(hidden_size, config.intermediate_size, bias=config.attention_bias)

    def forward(self, hidden_states: torch.Tensor, key_padding_mask: torch.BoolTensor | None = None) -> torch.Tensor:
        hidden_states = hidden_states + self.attention(
            self.attention_norm(hidden_states), key_padding_mask=key_padding_mask
        )
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class CrossAttentionBlock(GradientCheckpointingLayer):
    """Pre-LN cross-attention block (the MCAB of scLDM): queries attend to a context, residual on the queries.

    `queries [B, Q, H]`, `context [B, K, H]`, `key_padding_mask [B, K]` -> `[B, Q, H]`. With
    `normalize_context=False` the context enters the attention as given, e.g. gene tokens whose scale carries the count
    (a LayerNorm would erase it). `config` as for `SelfAttentionBlock`.
    """

    def __init__(self, config: PreTrainedConfig, num_heads: int, normalize_context: bool = True):
        super().__init__()
        hidden_size, eps = config.hidden_size, config.layer_norm_eps
        self.query_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.context_norm = nn.LayerNorm(hidden_size, eps=eps) if normalize_context else nn.Identity()
        self.attention = Attention(config, num_heads)
        self.mlp_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = SwiGLU(hidden_size, config.intermediate_size, bias=config.attention_bias)

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Context `[B, K, H]` -> (keys, values), each `[B, heads, K, H / heads]`."""
        return self.attention.project_context(self.context_norm(context))

    def project_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """Queries `[..., Q, H] -> [..., heads, Q, H / heads]`: the part of the block that does not see the context."""
        return self.attention.project_queries(self.query_norm(queries))

    def attend_projected(
        self,
        queries: torch.Tensor,
        projected_queries: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.BoolTensor | None = None,
    ) -> torch.Tensor:
        """The block from projected inputs: `queries [Q, H]` (shared) or `[B, Q, H]`, their `project_queries`, and
        `project_context` -> `[B, Q, H]`. Lets a caller project once and run the rest in chunks of queries."""
        attended = self.attention.attend(projected_queries, key, value, key_padding_mask=key_padding_mask)
        hidden_states = queries + attended
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))

    def forward(
        self, queries: torch.Tensor, context: torch.Tensor, key_padding_mask: torch.BoolTensor | None = None
    ) -> torch.Tensor:
        """`queries [Q, H]` (shared by every cell) or `[B, Q, H]`, `context [B, K, H]` -> `[B, Q, H]`."""
        key, value = self.project_context(context)
        return self.attend_projected(
            queries, self.project_queries(queries), key, value, key_padding_mask=key_padding_mask
        )


class SoftBinCountEmbedding(nn.Module):
    """Count embedding as a soft mixture of learned bin vectors: `softmax(mlp(value)) @ bins`, `[B, L] -> [B, L, H]`.

    The `softbin` input layer of scLDM.CD4: the gene token is `gene embedding + this`, so a zero count still gives each
    gene its own token.
    """

    def __init__(self, hidden_size: int, num_bins: int = 10, mlp_size: int = 64):
        super().__init__()
        self.count_mlp = nn.Sequential(nn.Linear(1, mlp_size), nn.SiLU(), nn.Linear(mlp_size, num_bins))
        self.bin_embeddings = nn.Parameter(torch.empty(num_bins, hidden_size))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        bin_weights = torch.softmax(self.count_mlp(values.unsqueeze(-1)), dim=-1)
        return bin_weights @ self.bin_embeddings
