"""Latent Diffusion Transformer (DiT) of scLDM: predicts the flow-matching velocity of VAE latent tokens.

Each of the `T` latent tokens of a cell is one input token. The conditioning vector `c` is the timestep embedding plus
one learned embedding per categorical covariate; it modulates every block through adaLN-Zero (Peebles & Xie, 2023).
Label id `covariate_num_labels[name]` (the last row of each table) is the *null* label used for classifier-free
guidance; a covariate missing from the input is treated as null.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_1d_sincos_pos_embed_from_grid
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero
from diffusers.utils import BaseOutput
from torch import nn

from ..errors import ConditionError, ConfigurationError, check_choice

from .layers import SwiGLU, swiglu_intermediate_size


FlowTime = Literal["sigma", "data_fraction"]


@dataclass
class LatentDiTOutput(BaseOutput):
    """Output of [`LatentDiTTransformer`].

    Args:
        sample (`torch.Tensor` of shape `[B, T, D]`): Predicted velocity `noise - latents`.
    """

    sample: torch.Tensor


class LatentDiTAttnProcessor:
    """Default processor of [`LatentDiTAttention`]: projections, then diffusers' `dispatch_attention_fn` (the
    backend of `set_attention_backend`, default torch's `scaled_dot_product_attention`). `[B, T, H] -> [B, T, H]`."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: "LatentDiTAttention", hidden_states: torch.Tensor) -> torch.Tensor:
        query, key, value = (
            projection(hidden_states).unflatten(-1, (attn.heads, attn.head_dim))
            for projection in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        attended = dispatch_attention_fn(
            query, key, value, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        return attn.o_proj(attended.flatten(-2).to(query.dtype))


class LatentDiTAttention(nn.Module, AttentionModuleMixin):
    """Multi-head self-attention over the latent tokens, `[B, T, H] -> [B, T, H]`, computed by its processor (diffusers'
    `set_processor` / the model's `set_attn_processor`). The projections keep the names `q_proj`/`k_proj`/`v_proj`/
    `o_proj` of saved and converted checkpoints (not diffusers' `to_q`...), so QKV fusion is not offered."""

    _default_processor_cls = LatentDiTAttnProcessor
    _available_processors = [LatentDiTAttnProcessor]
    _supports_qkv_fusion = False

    def __init__(self, hidden_size: int, heads: int, bias: bool, processor=None):
        super().__init__()
        if hidden_size % heads != 0:
            raise ConfigurationError(
                f"hidden_size={hidden_size} is not divisible by num_attention_heads={heads}; choose a head count "
                "that divides the hidden size."
            )
        self.heads = heads
        self.head_dim = hidden_size // heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.set_processor(processor or self._default_processor_cls())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.processor(self, hidden_states)


class DiTBlock(nn.Module):
    """Self-attention + SwiGLU block whose LayerNorms are shifted, scaled and gated by `c` (adaLN-Zero).

    `hidden_states [B, T, H]`, `conditioning [B, H]` -> `[B, T, H]`.
    """

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        intermediate_size: int,
        bias: bool,
        mlp_bias: bool,
        layer_norm_eps: float,
    ):
        super().__init__()
        self.attention_norm = AdaLayerNormZero(hidden_size)
        self.attention_norm.norm.eps = layer_norm_eps
        self.attention = LatentDiTAttention(hidden_size, num_attention_heads, bias=bias)
        self.mlp_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=layer_norm_eps)
        self.mlp = SwiGLU(hidden_size, intermediate_size, bias=mlp_bias)

    def forward(self, hidden_states: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        normed, gate_attention, shift_mlp, scale_mlp, gate_mlp = self.attention_norm(hidden_states, emb=conditioning)
        hidden_states = hidden_states + gate_attention[:, None] * self.attention(normed)
        normed = self.mlp_norm(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return hidden_states + gate_mlp[:, None] * self.mlp(normed)


class LatentDiTTransformer(ModelMixin, AttentionMixin, ConfigMixin):
    r"""Diffusion Transformer over the `[B, T, D]` latents of [`SCVAEModel`], conditioned on timestep and covariates.

    Attention is diffusers': `attn_processors` / `set_attn_processor(processor)` (e.g. `LatentDiTAttnProcessor()` or
    a callable `(attn, hidden_states) -> hidden_states`) and `set_attention_backend(...)`.

    Args:
        num_latent_tokens (`int`, defaults to 16): Latent tokens `T` per cell (`SCVAEConfig.num_latent_tokens`).
        latent_dim (`int`, defaults to 16): Dimension `D` of each latent token (`SCVAEConfig.latent_dim`).
        hidden_size (`int`, defaults to 256): Width `H` of the transformer.
        num_layers (`int`, defaults to 6): Number of DiT blocks.
        num_attention_heads (`int`, defaults to 4): Attention heads per block.
        intermediate_size (`int`, *optional*): SwiGLU width; defaults to `2/3 * 4 * hidden_size` rounded up to 8.
        timestep_embedding_dim (`int`, defaults to 256): Sinusoidal features of the timestep before its MLP.
        covariate_num_labels (`dict[str, int]`, *optional*):
            Number of labels of each categorical covariate. Each embedding table has one extra row, the null label.
        attention_bias (`bool`, defaults to True): Bias in attention and MLP projections.
        mlp_bias (`bool`, *optional*): Bias in the SwiGLU projections; defaults to `attention_bias`. The released
            scLDM has biased attention but bias-free MLPs.
        layer_norm_eps (`float`, defaults to 1e-6): Epsilon of every LayerNorm (the released scLDM uses 1e-8).
        flow_time (`"sigma"` or `"data_fraction"`, defaults to `"sigma"`):
            The time convention the network was trained in. Callers always pass `timestep = sigma * 1000` and get
            the velocity `noise - latents`. `"sigma"` feeds that timestep to the network as is. `"data_fraction"`
            feeds `t = 1 - sigma` (t = 0 noise, 1 data) and negates the network's output, which is the velocity
            `latents - noise` (the released scLDM's convention).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        num_latent_tokens: int = 16,
        latent_dim: int = 16,
        hidden_size: int = 256,
        num_layers: int = 6,
        num_attention_heads: int = 4,
        intermediate_size: int | None = None,
        timestep_embedding_dim: int = 256,
        covariate_num_labels: dict[str, int] | None = None,
        attention_bias: bool = True,
        mlp_bias: bool | None = None,
        layer_norm_eps: float = 1e-6,
        flow_time: FlowTime = "sigma",
    ):
        super().__init__()
        covariate_num_labels = dict(covariate_num_labels or {})
        for name in covariate_num_labels:
            _check_covariate_name(name)
        self.register_to_config(covariate_num_labels=covariate_num_labels)
        check_choice("flow_time", flow_time, FlowTime)
        intermediate_size = intermediate_size or swiglu_intermediate_size(hidden_size)
        mlp_bias = attention_bias if mlp_bias is None else mlp_bias

        self.proj_in = nn.Linear(latent_dim, hidden_size)
        positions = torch.arange(num_latent_tokens, dtype=torch.float64)
        position_embedding = get_1d_sincos_pos_embed_from_grid(hidden_size, positions)
        self.register_buffer("position_embedding", position_embedding.float()[None], persistent=False)
        self.time_proj = Timesteps(timestep_embedding_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(timestep_embedding_dim, hidden_size)
        self.covariate_embedders = nn.ModuleDict(
            {name: nn.Embedding(num_labels + 1, hidden_size) for name, num_labels in covariate_num_labels.items()}
        )
        self.transformer_blocks = nn.ModuleList(
            [
                DiTBlock(hidden_size, num_attention_heads, intermediate_size, attention_bias, mlp_bias, layer_norm_eps)
                for _ in range(num_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(hidden_size, hidden_size, elementwise_affine=False, eps=layer_norm_eps)
        self.proj_out = nn.Linear(hidden_size, latent_dim)
        self.gradient_checkpointing = False
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        """DiT initialisation: small label embeddings, and zero modulation and output layers so every block starts
        as the identity and the initial prediction is 0."""
        for embedder in self.covariate_embedders.values():
            nn.init.normal_(embedder.weight, std=0.02)
        for block in self.transformer_blocks:
            nn.init.zeros_(block.attention_norm.linear.weight)
            nn.init.zeros_(block.attention_norm.linear.bias)
        for layer in (self.norm_out.linear, self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def covariate_names(self) -> list[str]:
        """Names of the covariates the model is conditioned on, in config order."""
        return list(self.config.covariate_num_labels or {})

    def null_covariates(self, batch_size: int) -> dict[str, torch.LongTensor]:
        """The null label of every covariate for `batch_size` cells: `{name: LongTensor [B]}`."""
        return {
            name: torch.full((batch_size,), num_labels, dtype=torch.long, device=self.device)
            for name, num_labels in self.config.covariate_num_labels.items()
        }

    def embed_conditioning(
        self, timestep: torch.Tensor, covariates: dict[str, torch.LongTensor] | None, batch_size: int
    ) -> torch.Tensor:
        """`c = timestep embedding + sum_k covariate_k embedding`: `timestep [B]` (or scalar) -> `[B, H]`."""
        unknown = set(covariates or {}) - set(self.covariate_names)
        if unknown:
            raise ConditionError(
                f"The transformer has no covariate(s) {sorted(unknown)}; it is conditioned on {self.covariate_names}. "
                "Drop those keys or add the covariate with `add_covariate`."
            )
        timestep = torch.as_tensor(timestep, device=self.device).expand(batch_size)
        if self.config.flow_time == "data_fraction":
            timestep = 1 - timestep / 1000
        conditioning = self.timestep_embedder(self.time_proj(timestep).to(self.dtype))
        covariate_ids = {**self.null_covariates(batch_size), **(covariates or {})}
        for name, embedder in self.covariate_embedders.items():
            conditioning = conditioning + embedder(covariate_ids[name])
        return conditioning

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        covariates: dict[str, torch.LongTensor] | None = None,
        return_dict: bool = True,
    ) -> LatentDiTOutput | tuple[torch.Tensor]:
        """Predict the velocity `noise - latents`.

        Args:
            hidden_states (`torch.Tensor` `[B, T, D]`): Noisy latents `(1 - sigma) * latents + sigma * noise`.
            timestep (`torch.Tensor` `[B]` or scalar): `sigma * 1000`.
            covariates (`dict[str, torch.LongTensor [B]]`, *optional*): Label ids; missing covariates are null.
            return_dict (`bool`, defaults to True): Return a [`LatentDiTOutput`] instead of a tuple.
        """
        batch_size = hidden_states.shape[0]
        conditioning = self.embed_conditioning(timestep, covariates, batch_size)
        # diffusers' `from_pretrained(torch_dtype=...)` leaves non-persistent buffers in float32
        hidden_states = self.proj_in(hidden_states) + self.position_embedding.to(self.dtype)
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, hidden_states, conditioning)
            else:
                hidden_states = block(hidden_states, conditioning)
        velocity = self.proj_out(self.norm_out(hidden_states, conditioning))
        if self.config.flow_time == "data_fraction":
            velocity = -velocity
        if not return_dict:
            return (velocity,)
        return LatentDiTOutput(sample=velocity)

    def add_covariate_labels(self, name: str, num_new_labels: int) -> None:
        """Grow covariate `name` by `num_new_labels` labels (ids `num_labels ... num_labels + num_new_labels - 1`).

        Old label embeddings are kept bit-identical; the new labels and the (moved) null label start as copies of the
        learned null embedding, so a new label behaves like "unconditional" until fine-tuned.
        """
        if name not in self.covariate_embedders:
            raise ConditionError(
                f"The transformer has no covariate {name!r}; it is conditioned on {self.covariate_names}. "
                "Use `add_covariate` to add a new one."
            )
        if num_new_labels < 1:
            raise ConfigurationError(f"num_new_labels={num_new_labels} must be >= 1.")
        old_embedder = self.covariate_embedders[name]
        num_labels = old_embedder.num_embeddings - 1
        grown = nn.Embedding(
            num_labels + num_new_labels + 1, old_embedder.embedding_dim, device=self.device, dtype=self.dtype
        )
        with torch.no_grad():
            grown.weight[:num_labels] = old_embedder.weight[:num_labels]
            grown.weight[num_labels:] = old_embedder.weight[num_labels]
        self.covariate_embedders[name] = grown
        self.register_to_config(
            covariate_num_labels={**self.config.covariate_num_labels, name: num_labels + num_new_labels}
        )

    def add_covariate(self, name: str, num_labels: int) -> None:
        """Add a new covariate with `num_labels` labels. Its embeddings (null included) start at zero, so the model's
        predictions are unchanged until it is fine-tuned."""
        _check_covariate_name(name)
        if name in self.covariate_embedders:
            raise ConditionError(
                f"The transformer already has covariate {name!r}; use `add_covariate_labels` to add labels to it."
            )
        embedder = nn.Embedding(num_labels + 1, self.config.hidden_size, device=self.device, dtype=self.dtype)
        nn.init.zeros_(embedder.weight)
        self.covariate_embedders[name] = embedder
        self.register_to_config(covariate_num_labels={**self.config.covariate_num_labels, name: num_labels})


def _check_covariate_name(name: str) -> None:
    if not name or "." in name:
        raise ConfigurationError(
            f"Covariate name {name!r} cannot be used as a module name; use a non-empty name without '.'."
        )


__all__ = ["LatentDiTAttention", "LatentDiTAttnProcessor", "LatentDiTOutput", "LatentDiTTransformer"]
