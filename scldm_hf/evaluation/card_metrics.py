"""`ProtocolCardMetrics`: the metrics a model card reports, under the evaluation protocol of `evaluate_generation`.

Training does not import this package (imports go one way); `scldm_hf.workflows` passes an instance to the training
functions (their ``card_metrics=`` argument). The returned dict is the contract with the model card:
``{metric: value}`` plus ``{metric}_real_floor`` for every metric that has a real-vs-real floor.
"""

from collections.abc import Sequence

import numpy as np
import torch
from anndata import AnnData

from .evaluate import FLOOR_SUFFIX, METRIC_DESCRIPTIONS, evaluate_generation, floor_description
from .reconstruction import RoundTripDistance, reconstruction_metrics


class ProtocolCardMetrics:
    """Reconstruction metrics of the VAE card and generation metrics (with their floors) of the pipeline card."""

    def reconstruction(self, counts: torch.Tensor, mean: torch.Tensor, inverse_dispersion: torch.Tensor) -> dict[str, float]:
        """`reconstruction_metrics` of held-out counts `[N, G]` against the decoder's NB (`[N, G]`, `[N, G]`)."""
        return reconstruction_metrics(counts, mean, inverse_dispersion)

    def round_trip_distance(self, reference_counts: torch.Tensor, seed: int) -> RoundTripDistance:
        """`RoundTripDistance` (MMD^2 of held-out cells and their sampled round trips, PCA of `reference_counts`)."""
        return RoundTripDistance(reference_counts, seed)

    def generation(
        self,
        pipeline,
        reference: AnnData,
        held_out: AnnData,
        condition_key: Sequence[str],
        *,
        num_inference_steps: int,
        seed: int,
    ) -> dict[str, float]:
        """Generate one cell per `held_out` cell (its labels) and score it against `held_out` under the protocol.

        `reference` (the training cells) fits the PCA; the floor is `held_out` split in half per label; counts are
        equal per label. Returns the "mean" row: ``{metric: value, metric_real_floor: value, n_real, n_generated}``.
        """
        generated = pipeline(
            conditions=held_out.obs[list(condition_key)].reset_index(drop=True).astype(str),
            num_inference_steps=num_inference_steps,
            generator=torch.Generator().manual_seed(seed),
        ).cells
        table = evaluate_generation(held_out, generated, list(condition_key), reference=reference, seed=seed)
        return {name: float(value) for name, value in table.loc["mean"].items() if np.isfinite(value)}

    def descriptions(self, names: Sequence[str]) -> dict[str, str]:
        """Legend of the card's metrics (`METRIC_DESCRIPTIONS`, and the floor of each)."""
        return {name: floor_description(name) if name.endswith(FLOOR_SUFFIX) else METRIC_DESCRIPTIONS[name]
                for name in names if name in METRIC_DESCRIPTIONS or name.endswith(FLOOR_SUFFIX)}
