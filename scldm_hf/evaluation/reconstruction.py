"""Reconstruction quality of a count autoencoder: true counts against the decoder's negative binomial."""

import numpy as np
import torch

from ..models.modeling_scvae import negative_binomial_log_prob, normalized_log1p
from .genes import columnwise_pearson
from .preprocessing import TARGET_SUM


def reconstruction_metrics(counts, mean, inverse_dispersion) -> dict[str, float]:
    """Per-gene Pearson, MSE and NB negative log-likelihood of a reconstruction.

    Args:
        counts: true counts `[N, G]` (array or tensor).
        mean: predicted NB mean `[N, G]` over the same genes.
        inverse_dispersion: NB theta `[G]` or `[N, G]`.

    Returns:
        `reconstruction_pearson`: Pearson r across cells per gene, averaged over genes that vary in both, on
        log1p(x / total * 1e4) (true counts and predicted means, each normalised by its own total);
        `reconstruction_mse`: mean squared error in that space; `nb_nll_per_cell`: -log NB(counts) summed over genes,
        averaged over cells.
    """
    counts, mean, theta = (torch.as_tensor(x, dtype=torch.float32) for x in (counts, mean, inverse_dispersion))
    true_log = normalized_log1p(counts, counts.sum(dim=-1), TARGET_SUM)
    predicted_log = normalized_log1p(mean, mean.sum(dim=-1), TARGET_SUM)
    return {
        "reconstruction_pearson": float(np.nanmean(columnwise_pearson(true_log.numpy(), predicted_log.numpy()))),
        "reconstruction_mse": float(((true_log - predicted_log) ** 2).mean()),
        "nb_nll_per_cell": float(-negative_binomial_log_prob(counts, mean, theta).sum(dim=-1).mean()),
    }
