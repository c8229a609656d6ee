"""`ProtocolCardMetrics`: the metrics a model card reports, under the evaluation protocol of `evaluate_generation`.

Training does not import this package (imports go one way); `scldm_hf.workflows` passes an instance to the training
functions (their ``card_metrics=`` argument). The returned dict is the contract with the model card:
``{metric: value}`` plus ``{metric}_real_floor`` for every metric that has a real-vs-real floor.
"""

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .distribution import mmd_rbf
from .evaluate import FLOOR_SUFFIX, METRIC_DESCRIPTIONS, evaluate_generation, floor_description
from .preprocessing import ReferenceProjection, align_genes, count_matrix
from .reconstruction import RoundTripDistance, reconstruction_metrics

# generation_mmd draws at least this many cells (the held-out labels repeated): fewer generated cells add noise
MIN_GENERATED_CELLS = 512


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
        generated = generate_for_labels(pipeline, held_out, condition_key, num_inference_steps, seed)
        table = evaluate_generation(held_out, generated, list(condition_key), reference=reference, seed=seed)
        return {name: float(value) for name, value in table.loc["mean"].items() if np.isfinite(value)}

    def generation_distance(self, reference: AnnData, held_out: AnnData, condition_key: Sequence[str], *,
                            num_inference_steps: int, seed: int) -> "GenerationDistance":
        """`GenerationDistance` (MMD^2 of `held_out` and cells generated for its labels, PCA of `reference`)."""
        return GenerationDistance(reference, held_out, condition_key, num_inference_steps, seed)

    def descriptions(self, names: Sequence[str]) -> dict[str, str]:
        """Legend of the card's metrics (`METRIC_DESCRIPTIONS`, and the floor of each)."""
        return {name: floor_description(name) if name.endswith(FLOOR_SUFFIX) else METRIC_DESCRIPTIONS[name]
                for name in names if name in METRIC_DESCRIPTIONS or name.endswith(FLOOR_SUFFIX)}


def generate_for_labels(pipeline, held_out: AnnData, condition_key: Sequence[str], num_inference_steps: int,
                        seed: int, repeats: int = 1) -> AnnData:
    """`repeats` generated cells per `held_out` cell, with its labels (``obs[condition_key]``), seeded by `seed`."""
    conditions = held_out.obs[list(condition_key)].astype(str)
    return pipeline(
        conditions=pd.concat([conditions] * repeats, ignore_index=True),
        num_inference_steps=num_inference_steps,
        generator=torch.Generator().manual_seed(seed),
    ).cells


class GenerationDistance:
    """MMD^2 (RBF) between held-out cells and cells a pipeline generates for their labels, as `evaluate_generation`
    embeds them (log1p CP10k, 30-PC PCA fitted on `reference`), all cells pooled.

    Early stopping on it (``early_stopping_metric: generation_mmd``) keeps the DiT whose decoded cells are closest to
    real ones rather than the best flow-matching loss. Pooled over labels because a validation split has few cells
    per label; the held-out labels are repeated until at least `MIN_GENERATED_CELLS` cells are generated, and the
    noise, library sizes and counts are seeded by `seed` the same at every check.

    Args:
        reference: training cells (raw counts, the pipeline's genes).
        held_out: validation cells (raw counts) with the `condition_key` columns in ``obs``.
    """

    def __init__(self, reference: AnnData, held_out: AnnData, condition_key: Sequence[str], num_inference_steps: int,
                 seed: int):
        self.project = ReferenceProjection(count_matrix(reference, "reference"), seed=seed)
        self.held_out, self.real = held_out, self.project(count_matrix(held_out, "held_out"))
        self.condition_key, self.num_inference_steps, self.seed = list(condition_key), num_inference_steps, seed
        self.repeats = -(-MIN_GENERATED_CELLS // held_out.n_obs)

    def __call__(self, pipeline) -> float:
        generated = generate_for_labels(pipeline, self.held_out, self.condition_key, self.num_inference_steps,
                                        self.seed, self.repeats)
        generated = align_genes(self.held_out, generated)
        return mmd_rbf(self.real, self.project(count_matrix(generated, "generated")))
