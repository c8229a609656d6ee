"""`evaluate_generation`: the CFGen / scLDM protocol for judging generated cells against held-out real cells.

Both sets are log-normalised (log1p CP10k), embedded with a 30-component PCA fitted on real cells only (the real
training cells when given), and compared per condition; the "mean" row averages the conditions.
`summarize` puts several models side by side.
"""

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from tqdm.auto import tqdm

from ..errors import ConditionError
from ..validation import check_classifier_labels
from .classifiers import cell_type_f1, real_vs_generated_auroc
from .distribution import distribution_metrics
from .genes import gene_correlation_agreement, gene_moment_agreement
from .preprocessing import align_genes, condition_labels, count_matrix, fit_real_pca, log_normalize, subsample_rows

# Column -> what it measures and its ideal value; the report prints this as its legend.
METRIC_DESCRIPTIONS = {
    "n_real": "real cells compared (after subsampling)",
    "n_generated": "generated cells compared (after subsampling)",
    "mmd_rbf": "unbiased MMD^2, multi-scale RBF kernel on PCA (ideal 0)",
    "wasserstein_1": "W1, Euclidean cost on PCA (lower is better)",
    "wasserstein_2": "W2, squared Euclidean cost on PCA (lower is better)",
    "energy_distance": "energy distance on PCA (ideal 0)",
    "nn_accuracy": "leave-one-out 1-NN real-vs-generated accuracy (ideal 0.5)",
    "precision": "generated cells inside real k-NN balls (ideal 1)",
    "recall": "real cells inside generated k-NN balls (ideal 1)",
    "density": "average real k-NN balls containing a generated cell, / k (ideal 1)",
    "coverage": "real cells whose k-NN ball holds a generated cell (ideal 1)",
    "mean_pearson": "Pearson r of per-gene means, log1p CP10k (ideal 1)",
    "mean_r2": "R^2 of per-gene means (ideal 1)",
    "variance_pearson": "Pearson r of per-gene variances (ideal 1)",
    "variance_r2": "R^2 of per-gene variances (ideal 1)",
    "zero_fraction_pearson": "Pearson r of per-gene fraction of zeros (ideal 1)",
    "zero_fraction_r2": "R^2 of per-gene fraction of zeros (ideal 1)",
    "gene_correlation": "Pearson r between real and generated gene-gene correlations, top-variance genes (ideal 1)",
    "gene_correlation_all_cells": "same, over all cells at once (conditions pooled; stable with few cells per condition)",
    "classifier_auroc": "cross-validated random-forest AUROC, real vs generated (ideal 0.5)",
    "cell_type_f1_generated": "macro F1 on held-out real cells of a classifier trained on generated cells",
    "cell_type_f1_real": "same, trained on the real training cells (reference)",
    "cell_type_f1_real_plus_generated": "same, trained on real training + generated cells",
}


def evaluate_generation(
    real: AnnData,
    generated: AnnData,
    condition_key: str | Sequence[str],
    *,
    cell_type_key: str | Sequence[str] | None = None,
    real_train: AnnData | None = None,
    n_pca_components: int = 30,
    n_top_genes: int = 200,
    max_cells_per_condition: int = 2000,
    min_cells: int = 10,
    seed: int = 0,
) -> pd.DataFrame:
    """Metrics of `generated` against held-out `real` cells (both integer counts over the same genes).

    Args:
        real, generated: AnnData of counts; `generated` is reordered to `real.var_names`.
        condition_key: obs column(s) defining the conditions compared one by one (several are combined).
        cell_type_key: obs column(s) of the cell-type classifier task (default: `condition_key`).
        real_train: real training cells. The PCA is then fitted on them, so that held-out real and generated cells
            are both out-of-sample (a PCA fitted on the held-out cells themselves spreads them along its noise
            directions, which biases every metric when there are few cells per gene); without it the PCA is
            fitted on `real`. Also adds the F1 of a classifier trained on them, alone and with generated cells.
            For the same reason a "real floor" sample passed as `generated` must not come from `real_train`: use a
            real split disjoint from both `real` and `real_train`.
        n_top_genes: highest-variance real genes used for `gene_correlation`.
        max_cells_per_condition: cap on cells per set and condition (the exact OT solve is roughly cubic).
        min_cells: conditions with fewer real or generated cells are skipped with a warning.
        seed: seeds the PCA solver, the subsampling and the classifiers.

    Returns:
        DataFrame with one row per condition plus "mean" (average over conditions; `n_*` are summed there) and the
        columns of `METRIC_DESCRIPTIONS`. The `gene_correlation_all_cells` and `cell_type_f1_*` columns are
        whole-dataset scores, set in "mean" only.
    """
    generated = align_genes(real, generated)
    real_log = log_normalize(count_matrix(real, "real"))
    generated_log = log_normalize(count_matrix(generated, "generated"))
    if real_train is not None:
        real_train = align_genes(real, real_train, "real_train")
        train_log = log_normalize(count_matrix(real_train, "real_train"))
    pca = fit_real_pca(real_log if real_train is None else train_log, n_pca_components, seed=seed)
    real_pcs, generated_pcs = pca.transform(real_log), pca.transform(generated_log)
    real_conditions = condition_labels(real, condition_key)
    generated_conditions = condition_labels(generated, condition_key)

    rng = np.random.default_rng(seed)
    rows, skipped = {}, []
    for condition in tqdm(np.unique(real_conditions), desc="evaluating conditions"):
        real_cells = subsample_rows(np.flatnonzero(real_conditions == condition), max_cells_per_condition, rng)
        generated_cells = subsample_rows(
            np.flatnonzero(generated_conditions == condition), max_cells_per_condition, rng
        )
        if min(len(real_cells), len(generated_cells)) < min_cells:
            skipped.append(f"{condition} ({len(real_cells)} real, {len(generated_cells)} generated)")
            continue
        rows[condition] = {
            "n_real": len(real_cells),
            "n_generated": len(generated_cells),
            **distribution_metrics(real_pcs[real_cells], generated_pcs[generated_cells], seed=seed),
            **gene_moment_agreement(real_log[real_cells], generated_log[generated_cells]),
            "gene_correlation": gene_correlation_agreement(
                real_log[real_cells], generated_log[generated_cells], n_top_genes=n_top_genes
            ),
            "classifier_auroc": real_vs_generated_auroc(
                real_pcs[real_cells], generated_pcs[generated_cells], seed=seed
            ),
        }
    if not rows:
        raise ConditionError(
            f"No condition of '{condition_key}' has at least {min_cells} real and generated cells: {skipped}; "
            "generate more cells per condition or lower min_cells."
        )
    if skipped:
        warnings.warn(f"Skipped conditions with fewer than {min_cells} cells: {', '.join(skipped)}.", stacklevel=2)

    table = pd.DataFrame.from_dict(rows, orient="index")
    table.loc["mean"] = table.mean()
    table.loc["mean", ["n_real", "n_generated"]] = table.drop(index="mean")[["n_real", "n_generated"]].sum()
    table.loc["mean", "gene_correlation_all_cells"] = gene_correlation_agreement(
        real_log, generated_log, n_top_genes=n_top_genes
    )

    cell_type_key = condition_key if cell_type_key is None else cell_type_key
    real_types = condition_labels(real, cell_type_key)
    generated_types = condition_labels(generated, cell_type_key)
    check_classifier_labels(generated_types, "generated", cell_type_key)
    table.loc["mean", "cell_type_f1_generated"] = cell_type_f1(
        generated_pcs, generated_types, real_pcs, real_types, seed=seed
    )
    if real_train is not None:
        train_pcs = pca.transform(train_log)
        train_types = condition_labels(real_train, cell_type_key)
        table.loc["mean", "cell_type_f1_real"] = cell_type_f1(train_pcs, train_types, real_pcs, real_types, seed=seed)
        table.loc["mean", "cell_type_f1_real_plus_generated"] = cell_type_f1(
            np.concatenate([train_pcs, generated_pcs]),
            np.concatenate([train_types, generated_types]),
            real_pcs,
            real_types,
            seed=seed,
        )
    return table


def summarize(tables_by_model: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per model (its "mean" row), e.g. `{"real held-out": ..., "scLDM": ..., "scVI": ..., "naive NB": ...}`."""
    summary = pd.DataFrame({model: table.loc["mean"] for model, table in tables_by_model.items()}).T
    summary.index.name = "model"
    return summary
