"""`evaluate_generation`: the one protocol for judging generated cells against real cells (CLI, model cards, demo,
benchmarks).

1. Normalisation and embedding are fitted on a *reference* set that is neither of the two compared (the training
   cells): log1p(CP10k), then a 30-component PCA of the reference. A PCA fitted on the real cells themselves spreads
   them along their own noise directions and makes any other sample look far ("biased reference"); it is refused
   unless asked for, and then flagged in the notes.
2. Equal numbers of real and generated (and floor) cells per label: the larger sides are subsampled at random with
   the seeded generator, and the notes say how many cells were dropped.
3. The real-vs-real floor is scored beside every metric (`<metric>_real_floor`): a second real sample when given,
   else the real cells split in half per label (seeded), generated cells being scored against one half.
4. Labels with fewer than `min_cells` comparable cells are pooled into one "other (k labels)" group, listed with
   their counts in the notes; nothing is dropped silently.

The "mean" row averages the scored groups; `table.attrs["notes"]` holds the protocol notes; `format_evaluation`
prints both. `summarize` puts several models side by side.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from tqdm.auto import tqdm

from ..errors import ConfigurationError, InputDataError
from ..validation import check_classifier_labels
from .classifiers import cell_type_f1, real_vs_generated_auroc
from .distribution import distribution_metrics
from .genes import gene_correlation_agreement, gene_moment_agreement
from .preprocessing import align_genes, condition_labels, count_matrix, fit_real_pca, log_normalize, subsample_rows

FLOOR_SUFFIX = "_real_floor"
# fewest cells per side a group can be scored on: k = 5 nearest-neighbour balls and 5-fold AUROC need 6
MIN_SCORABLE_CELLS = 6

# Column -> what it measures and its ideal value; the report prints this as its legend.
METRIC_DESCRIPTIONS = {
    "n_real": "real cells compared (after equal-count subsampling)",
    "n_generated": "generated cells compared (= n_real per group)",
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
    "gene_correlation_all_cells": "same, over all compared cells at once (groups pooled; stable with few cells per group)",
    "classifier_auroc": "cross-validated random-forest AUROC, real vs generated (ideal 0.5)",
    "cell_type_f1_generated": "macro F1 on the compared real cells of a classifier trained on the generated cells",
    "cell_type_f1_reference": "same, trained on the reference (training) cells",
}


def floor_description(metric: str) -> str:
    """Legend of a `<metric>_real_floor` column."""
    return f"real-vs-real floor of {metric.removesuffix(FLOOR_SUFFIX)}: the same score between two real samples"


def evaluate_generation(
    real: AnnData,
    generated: AnnData,
    condition_key: str | Sequence[str],
    *,
    reference: AnnData | None = None,
    real_floor: AnnData | None = None,
    allow_biased_reference: bool = False,
    cell_type_key: str | Sequence[str] | None = None,
    n_pca_components: int = 30,
    n_top_genes: int = 200,
    max_cells_per_condition: int = 2000,
    min_cells: int = 10,
    seed: int = 0,
    layer: str | None = None,
) -> pd.DataFrame:
    """Metrics of `generated` against `real` cells (integer counts over the same genes), with the real floor beside.

    Args:
        real, generated: AnnData of counts; `generated` is reordered to `real.var_names`.
        condition_key: obs column(s) defining the groups compared one by one (several are combined).
        reference: the cells the normalisation and PCA are fitted on, e.g. the training cells; must be disjoint
            from `real` and `real_floor`.
        real_floor: a second real sample (disjoint from `real` and `reference`) scored against `real` as the floor;
            default: `real` split in half per label.
        allow_biased_reference: without `reference`, fit the PCA on `real` instead of refusing (flagged in notes).
        cell_type_key: obs column(s) of the cell-type classifier task (default: `condition_key`).
        n_top_genes: highest-variance real genes used for `gene_correlation`.
        max_cells_per_condition: cap on cells per side and group (the exact OT solve is roughly cubic).
        min_cells: labels with fewer comparable cells per side are pooled into one "other (k labels)" group.
        seed: seeds the PCA solver, the subsampling, the floor split and the classifiers.
        layer: the layer of `real`, `reference` and `real_floor` holding their counts (None: X); generated cells'
            counts are read from X, where the pipelines put them.

    Returns:
        DataFrame, one row per group plus "mean" (average of the scored groups; `n_*` summed), the columns of
        `METRIC_DESCRIPTIONS` each followed by its `<metric>_real_floor`; whole-data scores are set in "mean" only.
        `attrs["notes"]`: the protocol notes (reference, floor, subsampling, pooled labels).
    """
    if reference is None and not allow_biased_reference:
        raise ConfigurationError(
            "evaluate_generation needs reference=<training cells> (CLI: --reference train.h5ad) to fit the "
            "normalisation and PCA on cells that are neither real nor generated; pass allow_biased_reference=True "
            "(--allow-biased-reference) to fit it on the real cells, which biases every score."
        )
    if min_cells < MIN_SCORABLE_CELLS:
        raise ConfigurationError(f"min_cells={min_cells} is below {MIN_SCORABLE_CELLS}, the fewest cells a group "
                                 "can be scored on (5-NN balls, 5-fold AUROC); pass a larger min_cells.")
    for name, cells in (("real", real), ("generated", generated), ("reference", reference), ("real_floor", real_floor)):
        if cells is not None and cells.n_obs < MIN_SCORABLE_CELLS:
            raise InputDataError(f"The {name} sample has {cells.n_obs} cells; scoring needs at least "
                                 f"{MIN_SCORABLE_CELLS} (5-NN balls, 5-fold AUROC): pass more {name} cells.")
    rng = np.random.default_rng(seed)
    cell_type_key = condition_key if cell_type_key is None else cell_type_key
    samples = {"real": Sample.of(real, "real", condition_key, cell_type_key, layer)}
    samples["generated"] = Sample.of(align_genes(real, generated), "generated", condition_key, cell_type_key)
    notes = []
    if reference is None:
        notes.append("BIASED REFERENCE: the PCA is fitted on the real cells compared (no reference given), so real "
                     "cells look closer to each other than to any other sample; not comparable with protocol scores.")
        pca = fit_real_pca(samples["real"].log, n_pca_components, seed=seed)
    else:
        reference = Sample.of(align_genes(real, reference, "reference"), "reference", condition_key, cell_type_key,
                              layer)
        pca = fit_real_pca(reference.log, n_pca_components, seed=seed)
        notes.append(f"reference: log1p CP10k, {pca.n_components_}-PC PCA fitted on {len(reference.labels)} "
                     "reference cells (neither real nor generated)")
    if real_floor is None:
        target, floor = split_in_halves(samples["real"].labels, rng)
        samples["real"], samples["floor"] = samples["real"].rows(target), samples["real"].rows(floor)
        notes.append(f"floor: the real cells split in half per label (seed {seed}); generated cells are scored "
                     f"against one half ({len(target)} cells), the floor is the other half ({len(floor)} cells)")
    else:
        samples["floor"] = Sample.of(align_genes(real, real_floor, "real_floor"), "real_floor", condition_key,
                                     cell_type_key, layer)
        notes.append(f"floor: a second real sample of {real_floor.n_obs} cells scored against the real cells")
    groups, group_notes = equal_count_groups({side: sample.labels for side, sample in samples.items()},
                                             min_cells, max_cells_per_condition, rng)
    notes += group_notes
    if all(len(cells["real"]) < MIN_SCORABLE_CELLS for cells in groups.values()):
        halved = f" ({2 * MIN_SCORABLE_CELLS} real: they are split in half for the floor)" if real_floor is None else ""
        raise InputDataError(
            f"No group has {MIN_SCORABLE_CELLS} comparable cells on every side, even with the labels below min_cells "
            f"pooled ({group_notes[-1]}): pass at least {MIN_SCORABLE_CELLS} cells of a label per side{halved}."
        )
    pcs = {side: pca.transform(sample.log) for side, sample in samples.items()}

    rows = {}
    for group, cells in tqdm(groups.items(), desc="evaluating groups"):
        n = len(cells["real"])
        rows[group] = {"n_real": n, "n_generated": n}
        if n < MIN_SCORABLE_CELLS:
            continue
        real_log, real_pcs = samples["real"].log[cells["real"]], pcs["real"][cells["real"]]
        for side, suffix in (("generated", ""), ("floor", FLOOR_SUFFIX)):
            scores = group_scores(real_log, real_pcs, samples[side].log[cells[side]], pcs[side][cells[side]],
                                  n_top_genes=n_top_genes, seed=seed)
            rows[group] |= {name + suffix: value for name, value in scores.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.loc["mean"] = table.mean()
    table.loc["mean", ["n_real", "n_generated"]] = table.drop(index="mean")[["n_real", "n_generated"]].sum()

    compared = {side: np.concatenate([cells[side] for cells in groups.values()]) for side in samples}
    real_log, real_pcs = samples["real"].log[compared["real"]], pcs["real"][compared["real"]]
    real_types = samples["real"].types[compared["real"]]
    classify = len(pd.unique(samples["real"].types)) >= 2
    if classify:
        check_classifier_labels(samples["generated"].types[compared["generated"]], "generated", cell_type_key)
    else:
        notes.append(f"cell_type_f1 not scored: the real cells have one label in {cell_type_key!r} (a classifier "
                     "needs two).")
    for side, suffix in (("generated", ""), ("floor", FLOOR_SUFFIX)):
        side_log, side_pcs = samples[side].log[compared[side]], pcs[side][compared[side]]
        table.loc["mean", "gene_correlation_all_cells" + suffix] = gene_correlation_agreement(
            real_log, side_log, n_top_genes=n_top_genes)
        if classify:
            table.loc["mean", "cell_type_f1_generated" + suffix] = cell_type_f1(
                side_pcs, samples[side].types[compared[side]], real_pcs, real_types, seed=seed)
    if reference is not None and classify:
        table.loc["mean", "cell_type_f1_reference"] = cell_type_f1(
            pca.transform(reference.log), reference.types, real_pcs, real_types, seed=seed)
    table = table[[column for metric in METRIC_DESCRIPTIONS for column in (metric, metric + FLOOR_SUFFIX)
                   if column in table]]
    table.attrs["notes"] = notes
    return table


@dataclass
class Sample:
    """One set of cells: log1p CP10k expression `[N, G]` (CSR), group labels `[N]` and cell-type labels `[N]`."""

    log: sp.csr_matrix
    labels: np.ndarray
    types: np.ndarray

    @classmethod
    def of(cls, cells: AnnData, name: str, condition_key, cell_type_key, layer: str | None = None) -> "Sample":
        return cls(log_normalize(count_matrix(cells, name, layer)), condition_labels(cells, condition_key),
                   condition_labels(cells, cell_type_key))

    def rows(self, index: np.ndarray) -> "Sample":
        return Sample(self.log[index], self.labels[index], self.types[index])


def split_in_halves(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cell indices `[N/2]`, `[N/2]` of two random halves of every label (odd counts: the first half is larger)."""
    halves = ([], [])
    for label in np.unique(labels):
        cells = rng.permutation(np.flatnonzero(labels == label))
        halves[0].append(cells[: (len(cells) + 1) // 2])
        halves[1].append(cells[(len(cells) + 1) // 2:])
    return tuple(np.sort(np.concatenate(half)) for half in halves)


def equal_count_groups(
    labels_by_side: Mapping[str, np.ndarray], min_cells: int, max_cells: int, rng: np.random.Generator
) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
    """Cells compared per group: `{group: {side: cell indices}}` with equally many cells on every side, and notes.

    Each label of the first side (the real cells) keeps `min(cells on each side, max_cells)` random cells per side;
    labels below `min_cells` form one "other (k labels)" group (equal counts per label inside it).
    """
    first = next(iter(labels_by_side))
    label_counts = {label: {side: int((labels == label).sum()) for side, labels in labels_by_side.items()}
                    for label in np.unique(labels_by_side[first])}
    kept = {label: min(min(counts.values()), max_cells) for label, counts in label_counts.items()}
    small = [label for label, n in kept.items() if n < min_cells]

    def draw(label):
        return {side: subsample_rows(np.flatnonzero(labels == label), kept[label], rng)
                for side, labels in labels_by_side.items()}

    groups = {label: draw(label) for label in kept if label not in small}
    notes = []
    if small:
        pooled = [draw(label) for label in small]
        name = f"other ({len(small)} labels)"
        groups[name] = {side: np.concatenate([cells[side] for cells in pooled]) for side in labels_by_side}
        listed = ", ".join(
            f"{label} ({', '.join(f'{n} {side}' for side, n in label_counts[label].items())})" for label in small)
        status = "" if len(groups[name][first]) >= MIN_SCORABLE_CELLS else "; too few cells to score even pooled"
        notes.append(f"{name}: labels with fewer than {min_cells} comparable cells, pooled: {listed}{status}")
    totals = {side: len(labels) for side, labels in labels_by_side.items()}
    used = {side: sum(len(cells[side]) for cells in groups.values()) for side in labels_by_side}
    notes.append("equal cells per group and side: larger sides subsampled at random (seeded): " + ", ".join(
        f"{side} {totals[side]} -> {used[side]}" for side in labels_by_side))
    return groups, notes


def group_scores(real_log, real_pcs, other_log, other_pcs, n_top_genes: int, seed: int) -> dict[str, float]:
    """Every per-group metric of `other` cells against `real` cells (`*_log [n, G]`, `*_pcs [n, D]`)."""
    return {
        **distribution_metrics(real_pcs, other_pcs, seed=seed),
        **gene_moment_agreement(real_log, other_log),
        "gene_correlation": gene_correlation_agreement(real_log, other_log, n_top_genes=n_top_genes),
        "classifier_auroc": real_vs_generated_auroc(real_pcs, other_pcs, seed=seed),
    }


def format_evaluation(table: pd.DataFrame) -> str:
    """The protocol notes, then the table (each metric with its floor beside) as text."""
    notes = "\n".join(f"note: {note}" for note in table.attrs.get("notes", []))
    return f"{notes}\n{table.to_string(float_format='{:.4g}'.format)}"


def summarize(tables_by_model: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per model (its "mean" row, floors included), e.g. `{"scLDM": ..., "scVI": ..., "naive NB": ...}`."""
    summary = pd.DataFrame({model: table.loc["mean"] for model, table in tables_by_model.items()}).T
    summary.index.name = "model"
    summary.attrs["notes"] = [f"{model}: {note}" for model, table in tables_by_model.items()
                              for note in table.attrs.get("notes", [])]
    return summary
