"""Configuration of the permutation-invariant single-cell VAE (stage 1 of scLDM)."""

from typing import Literal, get_origin

from transformers import PreTrainedConfig

from ..errors import ConfigurationError, check_choice

from .layers import swiglu_intermediate_size


class SCVAEConfig(PreTrainedConfig):
    r"""Configuration of [`SCVAEModel`]. Defaults are close to the scLDM base VAE.

    Args:
        gene_names (`list[str]`):
            The gene vocabulary. Gene `gene_names[i]` has id `i + 1`; id 0 is padding (see `GeneVocab`).
        hidden_size (`int`, defaults to 64): Width of gene tokens, latent tokens and attention blocks.
        num_latent_tokens (`int`, defaults to 16): Number `T` of latent tokens (learned encoder queries).
        latent_dim (`int`, defaults to 16): Dimension `D` of each latent token.
        encoder_layers (`int`, defaults to 2): Self-attention blocks over latent tokens after the encoder's MCAB.
        decoder_layers (`int`, defaults to 2): Self-attention blocks over latent tokens before the gene read-out.
        encoder_cross_attention_heads (`int`, defaults to 4): Heads of the encoder's latent-to-genes cross-attention.
        decoder_cross_attention_heads (`int`, defaults to 4): Heads of the decoder's genes-to-latent cross-attention.
        num_attention_heads (`int`, defaults to 8): Heads of every self-attention block.
        intermediate_size (`int`, *optional*): SwiGLU width; defaults to `2/3 * 4 * hidden_size` rounded up to 8.
        value_encoding (`"log1p"`, `"concat"` or `"soft_bins"`, defaults to `"log1p"`):
            How a gene token combines its embedding `e` with the transformed count `v`: `"log1p"` uses `e * v`,
            `"concat"` a linear projection of `[e, v]`, `"soft_bins"` `e + softmax(mlp(v)) @ bins` over
            `num_count_bins` learned bin vectors (scLDM.CD4's `softbin` input layer).
        count_transform (`"log1p"`, `"normalized_log1p"` or `"none"`, defaults to `"normalized_log1p"`):
            Encoder input value: `log1p(count)`, `log1p(count / library_size * target_sum)`, or the raw count.
        num_count_bins (`int`, defaults to 10): Bin vectors of `value_encoding="soft_bins"`.
        count_bin_mlp_size (`int`, defaults to 64): Hidden width of the MLP that weighs the bins.
        encode_all_genes (`bool`, defaults to False):
            The encoder reads every vocabulary gene, zero counts included (genes absent from the input count as 0),
            instead of the expressed genes only. scLDM.CD4 is trained on all its genes densely; with `"soft_bins"` a
            zero count is not a zero token.
        target_sum (`float`, defaults to 1e4): Library size that `"normalized_log1p"` and the Gaussian head scale to.
        likelihood (`"negative_binomial"` or `"gaussian"`, defaults to `"negative_binomial"`):
            Negative binomial on counts (mean = softmax over decoded genes x library size), or a unit-variance
            Gaussian on `log1p(count / library_size * target_sum)`.
        dispersion (`"gene"` or `"gene-cell"`, defaults to `"gene"`):
            Negative binomial inverse dispersion: one learned value per vocabulary gene, or decoded per cell and gene.
        kl_weight (`float`, defaults to 0.0):
            0 gives scLDM's deterministic encoder (latents = non-affine LayerNorm of a projection); > 0 adds a
            reparameterised Gaussian posterior and weights its KL to N(0, I) by this factor.
        thinning_min_fraction (`float`, *optional*):
            Depth augmentation in training mode: each cell's counts (encoder input and reconstruction target alike)
            are binomially thinned to a fraction `p ~ U(thinning_min_fraction, 1)`, drawn per cell and step, as if the
            cell had been sequenced less deeply. The decoder then cannot score well by memorising training cells,
            which improves held-out reconstruction on small data sets. None (default) trains on the counts as given.
        decoder_latent_noise (`float`, *optional*):
            Latent noise augmentation in training mode: the decoder reconstructs each cell from its latent plus
            Gaussian noise of this many standard deviations of the batch's latents (per token and dimension, over
            the cells of the batch), so that it decodes latents near, not only at, the encoded cells (those a latent
            DiT generates). The encoder and the encoded latents are unchanged. None (default) decodes the latents as
            encoded.
        normalize_gene_embeddings (`bool`, defaults to True):
            LayerNorm the gene embedding before it is combined with the count, so that with `"log1p"` the count alone
            sets the token's scale. False feeds the raw embedding (the released scLDM).
        normalize_encoder_context (`bool`, defaults to False):
            LayerNorm the gene tokens inside the encoder's cross-attention. The released scLDM does (its `ln_1`); with
            `"log1p"` tokens this removes the count's scale, leaving the latents almost independent of the counts.
        normalize_decoder_output (`bool`, defaults to True):
            LayerNorm the decoded gene states before the output head. False feeds them to the head directly (the
            released scLDM).
        mask_padding_tokens (`bool`, defaults to True):
            Give padding gene tokens (id 0) zero attention weight in the encoder. False lets the encoder attend to
            them, as the released scLDM does (its latents then depend on the amount of padding).
        gene_cell_dispersion_activation (`"softplus"` or `"exp"`, defaults to `"softplus"`):
            Map from the decoded value to theta with `dispersion="gene-cell"`: `softplus(x) + 1e-4`, or `exp(x)`
            (the released scLDM's unshared theta).
        readout_chunk_size (`int`, *optional*):
            Genes per chunk of the decoder's per-gene read-out (results do not depend on it). None (default) picks
            the most genes whose `[batch, chunk, intermediate_size]` activations fit in 16 MiB.
        layer_norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
        attention_bias (`bool`, defaults to False): Bias in attention and MLP projections.
        initializer_range (`float`, defaults to 0.02): Std of the normal initialisation of linear and embedding weights.
        latents_mean (`list[list[float]]`, *optional*):
            Per-token, per-dimension `[T][D]` means of the training cells' latents, set when the latent DiT is first
            trained on this VAE (as diffusers' Wan VAE stores them).
        latents_std (`list[list[float]]`, *optional*):
            Their `[T][D]` standard deviations. The DiT models standardised latents `(z - mean) / std`, so that every
            coordinate varies on the scale of its Gaussian noise.
    """

    model_type = "scldm_vae"

    gene_names: list[str] | None = None
    hidden_size: int = 64
    num_latent_tokens: int = 16
    latent_dim: int = 16
    encoder_layers: int = 2
    decoder_layers: int = 2
    encoder_cross_attention_heads: int = 4
    decoder_cross_attention_heads: int = 4
    num_attention_heads: int = 8
    intermediate_size: int | None = None
    value_encoding: Literal["log1p", "concat", "soft_bins"] = "log1p"
    count_transform: Literal["log1p", "normalized_log1p", "none"] = "normalized_log1p"
    num_count_bins: int = 10
    count_bin_mlp_size: int = 64
    encode_all_genes: bool = False
    target_sum: float = 1e4
    likelihood: Literal["negative_binomial", "gaussian"] = "negative_binomial"
    dispersion: Literal["gene", "gene-cell"] = "gene"
    kl_weight: float = 0.0
    thinning_min_fraction: float | None = None
    decoder_latent_noise: float | None = None
    normalize_gene_embeddings: bool = True
    normalize_encoder_context: bool = False
    normalize_decoder_output: bool = True
    mask_padding_tokens: bool = True
    gene_cell_dispersion_activation: Literal["softplus", "exp"] = "softplus"
    readout_chunk_size: int | None = None
    layer_norm_eps: float = 1e-6
    attention_bias: bool = False
    initializer_range: float = 0.02
    latents_mean: list[list[float]] | None = None
    latents_std: list[list[float]] | None = None

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = swiglu_intermediate_size(self.hidden_size)
        self._check_values()
        super().__post_init__(**kwargs)

    def _check_values(self) -> None:
        for name, hint in SCVAEConfig.__annotations__.items():  # the options declared here
            if get_origin(hint) is Literal:
                check_choice(f"SCVAEConfig.{name}", getattr(self, name), hint)
        for name in ("encoder_cross_attention_heads", "decoder_cross_attention_heads", "num_attention_heads"):
            if self.hidden_size % getattr(self, name) != 0:
                raise ConfigurationError(
                    f"SCVAEConfig.hidden_size={self.hidden_size} is not divisible by {name}={getattr(self, name)}; "
                    "pick a head count that divides the hidden size."
                )
        if self.kl_weight < 0:
            raise ConfigurationError(f"SCVAEConfig.kl_weight={self.kl_weight} must be >= 0.")
        if self.thinning_min_fraction is not None and not 0 < self.thinning_min_fraction <= 1:
            raise ConfigurationError(
                f"SCVAEConfig.thinning_min_fraction={self.thinning_min_fraction} must be in (0, 1], or None for no "
                "thinning."
            )
        if self.decoder_latent_noise is not None and self.decoder_latent_noise <= 0:
            raise ConfigurationError(
                f"SCVAEConfig.decoder_latent_noise={self.decoder_latent_noise} must be > 0, or None for no latent noise."
            )
        if self.readout_chunk_size is not None and self.readout_chunk_size < 1:
            raise ConfigurationError(
                f"SCVAEConfig.readout_chunk_size={self.readout_chunk_size} must be >= 1, or None for automatic chunks."
            )
        if self.gene_names is not None and len(set(self.gene_names)) != len(self.gene_names):
            raise ConfigurationError("SCVAEConfig.gene_names contains duplicate genes; make gene names unique.")

    @property
    def vocab_size(self) -> int:
        """Number of genes in the vocabulary (embedding tables have `vocab_size + 1` rows, row 0 = padding)."""
        return len(self.gene_names or ())

    @property
    def uses_gaussian_posterior(self) -> bool:
        """Whether the encoder is a reparameterised Gaussian (`kl_weight > 0`) rather than deterministic."""
        return self.kl_weight > 0


__all__ = ["SCVAEConfig"]
