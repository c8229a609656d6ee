"""Reconstruction quality of a count autoencoder: true counts against the decoder's negative binomial."""

import numpy as np
import torch

from ..models.modeling_scvae import negative_binomial_log_prob, normalized_log1p, sample_negative_binomial
from .distribution import mmd_rbf
from .genes import columnwise_pearson
from .preprocessing import TARGET_SUM, ReferenceProjection


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


class RoundTripDistance:
    """MMD^2 (RBF) between held-out cells and their round trips, scored as generated cells are.

    The round trip is the VAE's decoded NB at each cell's own library size, counts drawn with a fixed seed; both sets
    are log1p CP10k and projected on a 30-PC PCA fitted on `reference_counts` (training cells: neither of the two
    compared), as `evaluate_generation` does. Early stopping on it (``early_stopping_metric: round_trip_mmd``) keeps
    the VAE whose reconstructions are distributionally closest to real cells, not only the best NB likelihood.

    Args:
        reference_counts: ``[N, G]`` counts of training cells.
        seed: seed of the NB draws (the same at every check, so checks differ only by the weights).
    """

    def __init__(self, reference_counts: torch.Tensor, seed: int):
        self.project = ReferenceProjection(reference_counts.numpy(), seed=seed)
        self.seed = seed

    def __call__(self, counts: torch.Tensor, mean: torch.Tensor, inverse_dispersion: torch.Tensor | None) -> float:
        """`counts`, `mean` ``[N, G]`` of the held-out cells and their decoded NB; `inverse_dispersion` broadcastable
        to ``[N, G]`` (None: Poisson)."""
        generator = torch.Generator().manual_seed(self.seed)
        round_trips = sample_negative_binomial(mean.float(), inverse_dispersion, generator=generator)
        return mmd_rbf(self.project(counts.numpy()), self.project(round_trips.numpy()))
