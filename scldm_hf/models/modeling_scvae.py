"""The permutation-invariant single-cell VAE of scLDM (stage 1) as a transformers `PreTrainedModel`.

A cell is a *set* of gene tokens (gene embedding combined with its count). The encoder's learned latent queries
cross-attend over that set (MCAB), so the latent `[T, D]` does not depend on token order or padding. The decoder
reads the latent tokens back out with one query per requested gene (the same gene embedding table), in any order and
for any subset of the vocabulary, and parametrises a negative binomial per gene:
`mean = softmax(logits over the decoded genes) * library_size`.
"""

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from os import PathLike
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from ..data.vocab import GeneVocab
from ..errors import ConfigurationError
from ..hub_code import write_class_code
from ..validation import check_decoder_genes, check_gene_tokens, check_library_size, check_panel_counts
from .configuration_scvae import SCVAEConfig
from .layers import CrossAttentionBlock, SelfAttentionBlock, SoftBinCountEmbedding

_LOG_EPS = 1e-8
# Largest float32 activation `[B, genes, intermediate]` of one decoder read-out chunk: 16 MiB, half of glibc's
# default mmap threshold, so chunks reuse heap memory instead of being mapped and page-faulted afresh every step.
READOUT_CHUNK_BYTES = 16 * 2**20


def negative_binomial_log_prob(
    counts: torch.Tensor, mean: torch.Tensor, inverse_dispersion: torch.Tensor
) -> torch.Tensor:
    """Elementwise log NB(counts | mean, inverse dispersion theta) (broadcasting).

    Same distribution as `torch.distributions.NegativeBinomial(total_count=theta, probs=mean / (mean + theta))`:
    variance `mean + mean**2 / theta` (tests/test_vae.py checks the two agree). Kept in this form rather than
    calling torch's class: it is the released scLDM's `log_nb_positive` (`scldm/distributions.py`, from scvi-tools),
    eps included, so a zero mean gives a finite log-probability where torch's logits would be -inf.
    """
    theta = inverse_dispersion
    log_theta_plus_mean = torch.log(theta + mean + _LOG_EPS)
    return (
        torch.lgamma(counts + theta)
        - torch.lgamma(theta)
        - torch.lgamma(counts + 1)
        + theta * (torch.log(theta + _LOG_EPS) - log_theta_plus_mean)
        + counts * (torch.log(mean + _LOG_EPS) - log_theta_plus_mean)
    )


def sample_negative_binomial(
    mean: torch.Tensor, inverse_dispersion: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> torch.LongTensor:
    """Draw counts by gamma-Poisson mixing: `rate ~ Gamma(theta, rate=theta / mean)`, `counts ~ Poisson(rate)`.

    `mean [B, G]`; `inverse_dispersion` broadcastable to it (`[G]` or `[B, G]`), or None for Poisson(mean). The draws
    happen on the generator's device, so a CPU generator works with a GPU model (as in diffusers); the counts come
    back on `mean`'s device. The draws are in float32 for any input dtype (CPU has no bf16/fp16 gamma or Poisson
    sampler).
    """
    sampling_device = generator.device if generator is not None else mean.device
    rate = mean.to(sampling_device, torch.float32)
    if inverse_dispersion is not None:
        theta = inverse_dispersion.to(sampling_device, torch.float32).expand_as(rate)
        # torch.distributions.Gamma cannot take a generator; its sampler can.
        rate = torch._standard_gamma(theta, generator=generator) * rate / theta
    return torch.poisson(rate, generator=generator).long().to(mean.device)


def all_gene_tokens(
    gene_ids: torch.LongTensor, counts: torch.Tensor, attention_mask: torch.BoolTensor, vocab_size: int
) -> tuple[torch.LongTensor, torch.Tensor, torch.BoolTensor]:
    """Gene tokens `[B, L]` -> every vocabulary gene as a token: `(gene_ids [B, V], counts [B, V], mask [B, V])`,
    count 0 for genes absent from the input, no padding."""
    dense = counts.new_zeros(len(gene_ids), vocab_size + 1).scatter_add_(1, gene_ids, counts * attention_mask)
    all_ids = torch.arange(1, vocab_size + 1, device=gene_ids.device).expand(len(gene_ids), -1)
    return all_ids, dense[:, 1:], torch.ones_like(all_ids, dtype=torch.bool)


def normalized_log1p(counts: torch.Tensor, library_size: torch.Tensor, target_sum: float) -> torch.Tensor:
    """`log1p(counts / library_size * target_sum)`; `counts [B, N]`, `library_size [B]`."""
    return torch.log1p(counts / library_size.clamp_min(1.0)[:, None] * target_sum)


@dataclass
class SCVAEEncoderOutput(ModelOutput):
    """Output of [`SCVAEModel.encode`].

    Args:
        latents (`torch.FloatTensor` of shape `[B, T, D]`): The cell latents (posterior samples when sampling).
        posterior_mean (`torch.FloatTensor` of shape `[B, T, D]`, *optional*): Gaussian posterior mean
            (only with `kl_weight > 0`).
        posterior_logvar (`torch.FloatTensor` of shape `[B, T, D]`, *optional*): Gaussian posterior log-variance.
    """

    latents: torch.FloatTensor | None = None
    posterior_mean: torch.FloatTensor | None = None
    posterior_logvar: torch.FloatTensor | None = None


@dataclass
class SCVAEDecoderOutput(ModelOutput):
    """Output of [`SCVAEModel.decode`].

    Args:
        mean (`torch.FloatTensor` of shape `[B, G]`): Expected counts of the decoded genes.
        inverse_dispersion (`torch.FloatTensor` of shape `[G]` or `[B, G]`, *optional*):
            Negative binomial inverse dispersion theta (None for the Gaussian likelihood).
        logits (`torch.FloatTensor` of shape `[B, G]`): Negative binomial: unnormalised log expression proportions;
            Gaussian: predicted `log1p(count / library_size * target_sum)`.
    """

    mean: torch.FloatTensor | None = None
    inverse_dispersion: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


@dataclass
class SCVAEOutput(ModelOutput):
    """Output of [`SCVAEModel.forward`].

    Args:
        loss (`torch.FloatTensor` scalar): `reconstruction_loss + kl_weight * kl_loss`.
        reconstruction_loss (`torch.FloatTensor` scalar): Negative log-likelihood summed over genes, mean over cells.
        kl_loss (`torch.FloatTensor` scalar, *optional*): KL(posterior || N(0, I)) per cell (Gaussian posterior only).
        latents (`torch.FloatTensor` of shape `[B, T, D]`): The latents that were decoded.
        mean (`torch.FloatTensor` of shape `[B, G]`): Expected counts of the panel genes.
        inverse_dispersion (`torch.FloatTensor` of shape `[G]` or `[B, G]`, *optional*): Negative binomial theta.
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    mean: torch.FloatTensor | None = None
    inverse_dispersion: torch.FloatTensor | None = None


class SCVAEEncoder(nn.Module):
    """Gene tokens `[B, L, H]` -> latent tokens: MCAB over the tokens, self-attention, projection to `D`."""

    def __init__(self, config: SCVAEConfig):
        super().__init__()
        hidden_size = config.hidden_size
        self.latent_queries = nn.Parameter(torch.empty(config.num_latent_tokens, hidden_size))
        # gene tokens are `embedding * log1p(count)`: a LayerNorm on them would remove the count
        self.cross_attention = CrossAttentionBlock(
            config, config.encoder_cross_attention_heads, normalize_context=config.normalize_encoder_context
        )
        self.layers = nn.ModuleList(
            SelfAttentionBlock(config, config.num_attention_heads) for _ in range(config.encoder_layers)
        )
        self.gaussian_posterior = config.uses_gaussian_posterior
        projection_size = 2 * config.latent_dim if self.gaussian_posterior else config.latent_dim
        self.latent_projection = nn.Linear(hidden_size, projection_size, bias=config.attention_bias)
        self.latent_norm = nn.LayerNorm(config.latent_dim, eps=config.layer_norm_eps, elementwise_affine=False)

    def forward(
        self, gene_tokens: torch.Tensor, attention_mask: torch.BoolTensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`gene_tokens [B, L, H]`, `attention_mask [B, L]` (None attends to every token) -> (latents or posterior
        mean `[B, T, D]`, log-variance)."""
        queries = self.latent_queries.expand(gene_tokens.shape[0], -1, -1)
        hidden_states = self.cross_attention(queries, gene_tokens, key_padding_mask=attention_mask)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        projected = self.latent_projection(hidden_states)
        if not self.gaussian_posterior:
            return self.latent_norm(projected), None
        posterior_mean, posterior_logvar = projected.chunk(2, dim=-1)
        return posterior_mean, posterior_logvar.clamp(-14.0, 10.0)


class SCVAEDecoder(nn.Module):
    """Latent tokens `[B, T, D]` + gene queries `[G, H]` or `[B, G, H]` -> per-gene outputs `[B, G, 1 or 2]`."""

    def __init__(self, config: SCVAEConfig):
        super().__init__()
        hidden_size = config.hidden_size
        self.latent_norm = nn.LayerNorm(config.latent_dim, eps=config.layer_norm_eps, elementwise_affine=False)
        self.latent_projection = nn.Linear(config.latent_dim, hidden_size, bias=config.attention_bias)
        self.layers = nn.ModuleList(
            SelfAttentionBlock(config, config.num_attention_heads) for _ in range(config.decoder_layers)
        )
        self.gene_readout = CrossAttentionBlock(config, config.decoder_cross_attention_heads)
        self.output_norm = (
            nn.LayerNorm(hidden_size, eps=config.layer_norm_eps) if config.normalize_decoder_output else nn.Identity()
        )
        per_cell_dispersion = config.likelihood == "negative_binomial" and config.dispersion == "gene-cell"
        self.output_head = nn.Linear(hidden_size, 2 if per_cell_dispersion else 1)
        self.chunk_size = config.readout_chunk_size
        self.intermediate_size = config.intermediate_size

    def forward(self, latents: torch.Tensor, gene_queries: torch.Tensor) -> torch.Tensor:
        """`latents [B, T, D]`, `gene_queries [G, H]` (one panel for every cell) or `[B, G, H]` -> `[B, G, 1 or 2]`.

        The per-gene read-out runs in chunks of `readout_chunk_size` genes, so that its `[B, chunk, intermediate]`
        activations stay small (below glibc's mmap threshold: no page faults each step); in training each chunk is
        recomputed in the backward pass (`torch.utils.checkpoint`) instead of keeping every chunk's activations.
        The query LayerNorm and projection, which do not depend on the cell, run once on a shared `[G, H]` panel.
        """
        hidden_states = self.latent_projection(self.latent_norm(latents))
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        key, value = self.gene_readout.project_context(hidden_states)
        projected_queries = self.gene_readout.project_queries(gene_queries)
        chunk_size = self.readout_chunk_size(batch_size=latents.shape[0])
        outputs = []
        for start in range(0, gene_queries.shape[-2], chunk_size):
            genes = slice(start, start + chunk_size)
            chunk = (gene_queries[..., genes, :], projected_queries[..., genes, :])
            if torch.is_grad_enabled():
                outputs.append(checkpoint(self._read_out_genes, *chunk, key, value, use_reentrant=False))
            else:
                outputs.append(self._read_out_genes(*chunk, key, value))
        return torch.cat(outputs, dim=-2)

    def readout_chunk_size(self, batch_size: int) -> int:
        """Genes per read-out chunk: `config.readout_chunk_size`, or the most whose SwiGLU activations
        `[batch_size, chunk, intermediate_size]` (float32) fit in `READOUT_CHUNK_BYTES`."""
        if self.chunk_size is not None:
            return self.chunk_size
        return max(1, READOUT_CHUNK_BYTES // (4 * batch_size * self.intermediate_size))

    def _read_out_genes(
        self, gene_queries: torch.Tensor, projected_queries: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """One chunk of genes: `gene_queries [g, H]` or `[B, g, H]` and their projection -> `[B, g, 1 or 2]`."""
        gene_states = self.gene_readout.attend_projected(gene_queries, projected_queries, key, value)
        return self.output_head(self.output_norm(gene_states))


class SCVAEModel(PreTrainedModel):
    """Permutation-invariant VAE over single-cell counts (scLDM stage 1).

    Inputs follow the batch contract of `CellCollator` (docs/DESIGN.md): `model(**batch)` trains, `encode` maps cells
    to latents `[B, T, D]`, `decode` maps latents to per-gene negative binomial parameters.
    """

    config_class = SCVAEConfig
    base_model_prefix = "scvae"
    main_input_name = "gene_ids"
    _no_split_modules = ["SelfAttentionBlock", "CrossAttentionBlock"]
    supports_gradient_checkpointing = True
    # attention goes through `layers.ATTENTION_FUNCTIONS` (`attn_implementation="eager" | "sdpa"`, default "sdpa").
    # Not flash/flex attention: the encoder's cross-attention has padded keys and a different number of queries,
    # which transformers' flash path unpads only for causal decoding, and flex needs a block mask.
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False

    def __init__(self, config: SCVAEConfig):
        super().__init__(config)
        if not config.gene_names:
            raise ConfigurationError(
                "SCVAEConfig.gene_names is empty; build the config with the gene vocabulary, "
                "e.g. SCVAEConfig(gene_names=vocab.genes)."
            )
        hidden_size = config.hidden_size
        self.gene_embedding = nn.Embedding(config.vocab_size + 1, hidden_size, padding_idx=GeneVocab.pad_id)
        # unit-scale gene vectors, so that the count alone sets the scale of a `log1p` gene token
        self.token_norm = (
            nn.LayerNorm(hidden_size, eps=config.layer_norm_eps) if config.normalize_gene_embeddings else nn.Identity()
        )
        self.value_projection = nn.Linear(hidden_size + 1, hidden_size) if config.value_encoding == "concat" else None
        self.count_embedding = (
            SoftBinCountEmbedding(hidden_size, config.num_count_bins, config.count_bin_mlp_size)
            if config.value_encoding == "soft_bins"
            else None
        )
        self.encoder = SCVAEEncoder(config)
        self.decoder = SCVAEDecoder(config)
        gene_dispersion = config.likelihood == "negative_binomial" and config.dispersion == "gene"
        self.log_inverse_dispersion = nn.Parameter(torch.empty(config.vocab_size + 1)) if gene_dispersion else None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SCVAEEncoder):
            init.normal_(module.latent_queries, mean=0.0, std=1.0)
        elif isinstance(module, SoftBinCountEmbedding):
            init.normal_(module.bin_embeddings, mean=0.0, std=1.0)
        elif isinstance(module, SCVAEModel) and module.log_inverse_dispersion is not None:
            init.zeros_(module.log_inverse_dispersion)

    def save_pretrained(self, save_directory: str | PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, plus this model's code (`modeling_scvae.py` and every module it imports)
        named in the `auto_map` of `config.json`, so that `AutoModel.from_pretrained(folder, trust_remote_code=True)`
        loads the folder (or a Hub repo uploaded from it) where scldm_hf is not installed (see `hub_code`)."""
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        self.config.auto_map = {
            "AutoConfig": write_class_code(self.config_class, save_directory),
            "AutoModel": write_class_code(type(self), save_directory),
        }
        super().save_pretrained(save_directory, *args, **kwargs)

    @cached_property
    def gene_vocab(self) -> GeneVocab:
        """The model's gene vocabulary (`config.gene_names`; gene `i` has id `i + 1`)."""
        return GeneVocab(list(self.config.gene_names))

    def embed_gene_tokens(
        self, gene_ids: torch.LongTensor, counts: torch.Tensor, library_size: torch.Tensor
    ) -> torch.Tensor:
        """Gene tokens `[B, L, H]` (in the model's dtype) from `gene_ids [B, L]`, raw `counts [B, L]` and
        `library_size [B]` (any float dtype: the count transform runs in float32)."""
        if self.config.count_transform == "normalized_log1p":
            values = normalized_log1p(counts.float(), library_size.float(), self.config.target_sum)
        elif self.config.count_transform == "log1p":
            values = torch.log1p(counts.float())
        else:
            values = counts.float()
        embeddings = self.token_norm(self.gene_embedding(gene_ids))
        values = values.to(embeddings.dtype)
        if self.count_embedding is not None:
            return embeddings + self.count_embedding(values)
        if self.value_projection is None:
            return embeddings * values.unsqueeze(-1)
        return self.value_projection(torch.cat([embeddings, values.unsqueeze(-1)], dim=-1))

    def check_inputs(self, gene_ids: torch.LongTensor, counts: torch.Tensor, attention_mask: torch.BoolTensor) -> None:
        """Validate a gene-token batch (`[B, L]` each) in eval mode only: in training mode batches come from a corpus
        validated once at conversion (`anndata_to_corpus` checks the counts, the collator maps vocabulary genes only),
        so the checks' host synchronisations stay out of the training step."""
        if not self.training:
            check_gene_tokens(gene_ids, counts, attention_mask, vocab_size=self.config.vocab_size)

    def encode(
        self,
        gene_ids: torch.LongTensor,
        counts: torch.Tensor,
        attention_mask: torch.BoolTensor,
        library_size: torch.Tensor | None = None,
        sample_posterior: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> SCVAEEncoderOutput:
        """Encode cells given as gene tokens.

        Args:
            gene_ids (`[B, L]`): vocab ids of expressed genes, 0 = padding.
            counts (`[B, L]`): raw counts at those genes (0 at padding).
            attention_mask (`[B, L]`): True for real tokens; padding has no influence on the latents (unless
                `config.mask_padding_tokens=False`).
            library_size (`[B]`, *optional*): total counts per cell; defaults to the sum of `counts`.
            sample_posterior (`bool`, *optional*): draw from the Gaussian posterior instead of taking its mean;
                defaults to `self.training`. Ignored by the deterministic encoder.
            generator (`torch.Generator`, *optional*): RNG for posterior samples.
        """
        self.check_inputs(gene_ids, counts, attention_mask)
        attention_mask = attention_mask.bool()
        if library_size is None:
            library_size = (counts * attention_mask).sum(dim=-1)
        if self.config.encode_all_genes:
            gene_ids, counts, attention_mask = all_gene_tokens(gene_ids, counts, attention_mask, self.config.vocab_size)
        tokens = self.embed_gene_tokens(gene_ids, counts, library_size)
        key_padding_mask = attention_mask if self.config.mask_padding_tokens else None
        posterior_mean, posterior_logvar = self.encoder(tokens, key_padding_mask)
        if posterior_logvar is None:
            return SCVAEEncoderOutput(latents=posterior_mean)
        latents = posterior_mean
        if self.training if sample_posterior is None else sample_posterior:
            noise = torch.randn(
                posterior_mean.shape, generator=generator, device=posterior_mean.device, dtype=posterior_mean.dtype
            )
            latents = posterior_mean + noise * torch.exp(0.5 * posterior_logvar)
        return SCVAEEncoderOutput(latents=latents, posterior_mean=posterior_mean, posterior_logvar=posterior_logvar)

    def decode(
        self, latents: torch.Tensor, gene_ids: torch.LongTensor | None = None, library_size: torch.Tensor | None = None
    ) -> SCVAEDecoderOutput:
        """Decode latents `[B, T, D]` into per-gene expression for `gene_ids`.

        Args:
            latents (`[B, T, D]`): cell latents.
            gene_ids (`[G]` or `[B, G]`, *optional*): vocab ids to decode, any subset and order; default every gene.
            library_size (`[B]`): total counts each cell should have over the decoded genes.
        """
        batch_size = latents.shape[0]
        if gene_ids is None:
            gene_ids = torch.arange(1, self.config.vocab_size + 1, device=latents.device)
        check_decoder_genes(gene_ids, batch_size=batch_size, vocab_size=self.config.vocab_size)
        check_library_size(library_size, batch_size=batch_size)
        # the likelihood's parameters are float32 whatever the model's dtype (a bf16 softmax over genes is coarse)
        outputs = self.decoder(latents.to(self.dtype), self.gene_embedding(gene_ids)).float()
        logits = outputs[..., 0]
        if self.config.likelihood == "gaussian":
            mean = torch.expm1(logits).clamp_min(0.0) * library_size[:, None] / self.config.target_sum
            return SCVAEDecoderOutput(mean=mean, inverse_dispersion=None, logits=logits)
        mean = torch.softmax(logits, dim=-1) * library_size[:, None]
        if self.log_inverse_dispersion is None and self.config.gene_cell_dispersion_activation == "exp":
            inverse_dispersion = torch.exp(outputs[..., 1])
        elif self.log_inverse_dispersion is None:
            inverse_dispersion = F.softplus(outputs[..., 1]) + 1e-4
        else:
            inverse_dispersion = torch.exp(self.log_inverse_dispersion[gene_ids].float())
        return SCVAEDecoderOutput(mean=mean, inverse_dispersion=inverse_dispersion, logits=logits)

    def reconstruction_nll(
        self, decoded: SCVAEDecoderOutput, counts: torch.Tensor, library_size: torch.Tensor
    ) -> torch.Tensor:
        """Per-cell negative log-likelihood `[B]` of dense `counts [B, G]` under `decoded`, summed over genes."""
        if self.config.likelihood == "gaussian":
            target = normalized_log1p(counts, library_size, self.config.target_sum)
            return 0.5 * (decoded.logits - target).pow(2).sum(dim=-1)
        return -negative_binomial_log_prob(counts, decoded.mean, decoded.inverse_dispersion).sum(dim=-1)

    def forward(
        self,
        gene_ids: torch.LongTensor,
        counts: torch.Tensor,
        attention_mask: torch.BoolTensor,
        library_size: torch.Tensor,
        panel_counts: torch.Tensor,
        panel_gene_ids: torch.LongTensor | None = None,
        covariates: dict[str, torch.LongTensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> SCVAEOutput:
        """Encode the gene tokens, decode `panel_gene_ids` (`[G]`; default every vocab gene) and score `panel_counts`.

        Accepts a `CellCollator` batch as `model(**batch)`; `covariates` are ignored (the VAE is unconditional).
        In training mode with `config.thinning_min_fraction`, the cells are first thinned (`thin_cells`); with
        `config.decoder_latent_noise`, the decoder reads noised latents (`noised_latents`; `latents` stay the encoded).
        """
        if self.training and self.config.thinning_min_fraction is not None:
            counts, attention_mask, library_size, panel_counts = self.thin_cells(
                gene_ids, counts, attention_mask, library_size, panel_counts, panel_gene_ids, generator=generator
            )
        encoded = self.encode(gene_ids, counts, attention_mask, library_size=library_size, generator=generator)
        latents = encoded.latents
        if self.training and self.config.decoder_latent_noise is not None:
            latents = self.noised_latents(latents, generator=generator)
        decoded = self.decode(latents, gene_ids=panel_gene_ids, library_size=library_size)
        check_panel_counts(panel_counts, expected_shape=decoded.mean.shape)
        reconstruction_loss = self.reconstruction_nll(decoded, panel_counts, library_size).mean()
        loss, kl_loss = reconstruction_loss, None
        if encoded.posterior_logvar is not None:
            # in float32 like the likelihood: under bf16 autocast the posterior comes out of a bf16 matmul
            mean, logvar = encoded.posterior_mean.float(), encoded.posterior_logvar.float()
            kl_loss = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2)).mean()
            loss = loss + self.config.kl_weight * kl_loss
        return SCVAEOutput(
            loss=loss,
            reconstruction_loss=reconstruction_loss,
            kl_loss=kl_loss,
            latents=encoded.latents,
            mean=decoded.mean,
            inverse_dispersion=decoded.inverse_dispersion,
        )

    def thin_cells(
        self,
        gene_ids: torch.LongTensor,
        counts: torch.Tensor,
        attention_mask: torch.BoolTensor,
        library_size: torch.Tensor,
        panel_counts: torch.Tensor,
        panel_gene_ids: torch.LongTensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.BoolTensor, torch.Tensor, torch.Tensor]:
        """Binomially thin each cell to a fraction `p ~ U(config.thinning_min_fraction, 1)` of its counts.

        Takes a batch as `forward` does (`[B, L]` tokens, `library_size [B]`, `panel_counts [B, G]`) and returns
        thinned `(counts [B, L], attention_mask [B, L], library_size [B], panel_counts [B, G])`: a token keeps the
        thinned count of its panel gene, so input and target stay one cell; tokens left with no count are masked out
        (unless none is left), and the counts outside the panel are thinned into `library_size` with the same `p`.
        """
        self.check_inputs(gene_ids, counts, attention_mask)
        if panel_gene_ids is None:
            panel_gene_ids = torch.arange(1, self.config.vocab_size + 1, device=counts.device)
        check_decoder_genes(panel_gene_ids, batch_size=len(library_size), vocab_size=self.config.vocab_size)
        if panel_gene_ids.dim() != 1:
            raise ConfigurationError(
                "thinning_min_fraction needs one gene panel `[G]` shared by the batch, got per-cell panels "
                f"{tuple(panel_gene_ids.shape)}; use CellCollator's shared panel or set thinning_min_fraction=None."
            )
        low = self.config.thinning_min_fraction
        keep = low + (1 - low) * torch.rand(len(library_size), 1, generator=generator, device=counts.device)
        thinned_panel = torch.binomial(panel_counts, keep.expand_as(panel_counts), generator=generator)
        outside_panel = (library_size - panel_counts.sum(dim=-1)).clamp_min(0)[:, None]
        thinned_outside = torch.binomial(outside_panel, keep, generator=generator)[:, 0]

        panel_position = torch.full((self.config.vocab_size + 1,), -1, dtype=torch.long, device=counts.device)
        panel_position[panel_gene_ids] = torch.arange(len(panel_gene_ids), device=counts.device)
        position = panel_position[gene_ids]
        thinned = torch.where(
            position >= 0,
            thinned_panel.gather(1, position.clamp_min(0)),
            torch.binomial(counts, keep.expand_as(counts), generator=generator),
        ) * attention_mask
        kept = attention_mask.bool() & (thinned > 0)
        kept = torch.where(kept.any(dim=-1, keepdim=True), kept, attention_mask.bool())
        return thinned, kept, thinned_panel.sum(dim=-1) + thinned_outside, thinned_panel

    def noised_latents(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """`latents [B, T, D]` plus Gaussian noise of `config.decoder_latent_noise` times their std over the batch
        (per token and dimension, not back-propagated)."""
        spread = latents.detach().std(dim=0, correction=0, keepdim=True)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        return latents + self.config.decoder_latent_noise * spread * noise

    def set_latent_statistics(self, latents: torch.Tensor) -> None:
        """Store the mean and std over cells of `latents [N, T, D]` in the config (see `SCVAEConfig.latents_mean`)."""
        self.config.latents_mean = latents.mean(dim=0).tolist()
        self.config.latents_std = latents.std(dim=0).clamp_min(1e-6).tolist()

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """`[B, T, D]` VAE latents -> standardised latents the DiT models (unchanged without statistics)."""
        if self.config.latents_mean is None:
            return latents
        mean, std = self._latent_statistics(latents)
        return (latents - mean) / std

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize_latents`, `[B, T, D] -> [B, T, D]`."""
        if self.config.latents_mean is None:
            return latents
        mean, std = self._latent_statistics(latents)
        return latents * std + mean

    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mean, std)`, each `[T, D]`, on the device and dtype of `like`."""
        placement = {"dtype": like.dtype, "device": like.device}
        return torch.tensor(self.config.latents_mean, **placement), torch.tensor(self.config.latents_std, **placement)

    def sample_counts(
        self,
        mean: torch.Tensor,
        inverse_dispersion: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.LongTensor:
        """Counts `[B, G]` drawn from `mean [B, G]` and `inverse_dispersion` (`[G]`/`[B, G]`; None = Poisson)."""
        return sample_negative_binomial(mean, inverse_dispersion, generator=generator)

    # --- scvi-tools-style AnnData methods: thin wrappers of scldm_hf.data.encoding, imported by name when called
    # so that the AnnData plumbing stays out of the code saved with the model (docs/DESIGN.md, hub_code); they
    # need the installed package. ---
    data_encoding_module = "scldm_hf.data.encoding"

    def get_latent_representation(
        self, adata, layer: str | None = None, indices: Sequence[int] | None = None, batch_size: int = 256
    ) -> np.ndarray:
        """Posterior-mean latents of the cells of `adata` (raw counts in `X` or `layers[layer]`; `indices` selects
        cells), flattened to `[N, T * D]` so that `adata.obsm["X_scldm"] = ...` feeds scanpy's neighbours/UMAP."""
        cells = adata if indices is None else adata[indices]
        latents = importlib.import_module(self.data_encoding_module).encode_dataset(
            self, cells, batch_size=batch_size, layer=layer)
        return latents.reshape(cells.n_obs, -1)

    def get_normalized_expression(
        self,
        adata,
        layer: str | None = None,
        indices: Sequence[int] | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | str = 1.0,
        batch_size: int = 256,
    ):
        """Decoded expression (a DataFrame `[N, genes]`, index `obs_names`) of the cells of `adata` at
        `library_size` counts per cell (1.0: frequencies; `"latent"`: each cell's observed total), as scvi-tools'
        method of that name; see `scldm_hf.data.encoding.normalized_expression`."""
        cells = adata if indices is None else adata[indices]
        return importlib.import_module(self.data_encoding_module).normalized_expression(
            self, cells, layer=layer, library_size=library_size, gene_list=gene_list, batch_size=batch_size)


__all__ = [
    "SCVAEDecoderOutput",
    "SCVAEEncoderOutput",
    "SCVAEModel",
    "SCVAEOutput",
    "negative_binomial_log_prob",
    "sample_negative_binomial",
]
