"""`CardMetrics`: what training asks of an evaluator for its model cards, without importing the evaluation layer.

`scldm_hf.evaluation.ProtocolCardMetrics` implements it; `scldm_hf.workflows` passes it to the training functions.
`reconstruction` and `generation` return the card's metrics dict: ``{metric: value}`` plus ``{metric}_real_floor``
where a floor exists; `round_trip_distance` and `generation_distance` give the early-stopping scores
``round_trip_mmd`` (VAE) and ``generation_mmd`` (DiT).
"""

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from anndata import AnnData


# (held-out counts [N, G], decoded NB mean [N, G], inverse dispersion broadcastable to [N, G] or None) -> distance
RoundTripScore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], float]
# (pipeline with the weights to score) -> distance of its generated cells to the held-out cells
GenerationScore = Callable[[object], float]


class CardMetrics(Protocol):
    def reconstruction(self, counts: torch.Tensor, mean: torch.Tensor, inverse_dispersion: torch.Tensor) -> dict[str, float]:
        """Metrics of held-out counts `[N, G]` against the VAE's NB mean `[N, G]` and inverse dispersion `[N, G]`."""

    def generation(self, pipeline, reference: AnnData, held_out: AnnData, condition_key: Sequence[str], *,
                   num_inference_steps: int, seed: int) -> dict[str, float]:
        """Metrics of cells generated for `held_out`'s labels against `held_out`, PCA fitted on `reference`."""

    def round_trip_distance(self, reference_counts: torch.Tensor, seed: int) -> RoundTripScore:
        """The distance (lower is better) between held-out cells and their round trips through the VAE, its
        normalisation fitted on `reference_counts` `[N, G]` (training cells); NB draws seeded by `seed`."""

    def generation_distance(self, reference: AnnData, held_out: AnnData, condition_key: Sequence[str], *,
                            num_inference_steps: int, seed: int) -> GenerationScore:
        """The distance (lower is better) between `held_out` cells and cells a pipeline generates for their labels,
        normalisation fitted on `reference` (training cells); noise and counts seeded by `seed`."""

    def descriptions(self, names: Sequence[str]) -> dict[str, str]:
        """What each metric of `names` measures (and its ideal value), for the card's legend."""
