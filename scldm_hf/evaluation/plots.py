"""Figures comparing real and generated cells, written as PNG files (matplotlib Agg backend, no display needed).

All plots start from `combine_real_and_generated`: one AnnData of log1p(CP10k) expression with obs `condition`
and `source` ("real" or the model name) and obsm `X_pca` (PCA fitted on the real cells only).
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData

from ..errors import ConfigurationError
from .genes import columnwise_pearson, gene_moments
from .preprocessing import align_genes, condition_labels, count_matrix, fit_real_pca, log_normalize

matplotlib.use("Agg")  # headless: figures are only written to files

REAL_SOURCE = "real"
DPI = 120


def combine_real_and_generated(
    real: AnnData,
    generated_by_model: Mapping[str, AnnData],
    condition_key: str | Sequence[str],
    n_pca_components: int = 30,
    seed: int = 0,
) -> AnnData:
    """Log-normalised real + generated cells `[N_real + sum N_model, G]`; obs `condition`, `source`; obsm `X_pca`."""
    if REAL_SOURCE in generated_by_model:
        raise ConfigurationError(
            f"generated_by_model uses the reserved name '{REAL_SOURCE}' for a model; rename it (e.g. 'real held-out')."
        )
    generated = {name: align_genes(real, cells, name) for name, cells in generated_by_model.items()}
    sources = {REAL_SOURCE: real, **generated}
    expression = {name: log_normalize(count_matrix(cells, name)) for name, cells in sources.items()}
    obs = pd.concat(
        [
            pd.DataFrame({"condition": condition_labels(cells, condition_key), "source": name})
            for name, cells in sources.items()
        ],
        ignore_index=True,
    )
    obs["source"] = pd.Categorical(obs["source"], categories=list(sources))
    obs["condition"] = pd.Categorical(obs["condition"])
    obs.index = obs.index.astype(str)
    combined = AnnData(sp.vstack(list(expression.values())).tocsr(), obs=obs, var=pd.DataFrame(index=real.var_names))
    combined.obsm["X_pca"] = fit_real_pca(expression[REAL_SOURCE], n_pca_components, seed=seed).transform(combined.X)
    combined.uns["log1p"] = {"base": None}
    return combined


def _condition_colors(conditions: pd.Categorical) -> dict[str, tuple]:
    palette = plt.get_cmap("tab20" if len(conditions.categories) > 10 else "tab10")
    return {condition: palette(i % palette.N) for i, condition in enumerate(conditions.categories)}


def plot_umap(combined: AnnData, path: str | Path, seed: int = 0) -> Path:
    """UMAP of all cells: one panel coloured by source, then one panel per source coloured by condition."""
    sc.pp.neighbors(combined, use_rep="X_pca", random_state=seed)
    sc.tl.umap(combined, random_state=seed)
    umap = combined.obsm["X_umap"]
    sources = list(combined.obs["source"].cat.categories)
    colors = _condition_colors(combined.obs["condition"].cat)
    n_columns = min(3, len(sources) + 1)
    n_rows = -(-(len(sources) + 1) // n_columns)
    figure, axes = plt.subplots(n_rows, n_columns, figsize=(4.5 * n_columns, 4.2 * n_rows), squeeze=False)
    axes = axes.ravel()

    source_colors = plt.get_cmap("Set1")(combined.obs["source"].cat.codes.to_numpy())
    drawing_order = np.random.default_rng(seed).permutation(combined.n_obs)  # no source hides the others
    axes[0].scatter(*umap[drawing_order].T, s=4, c=source_colors[drawing_order], alpha=0.6)
    axes[0].legend(
        [plt.Line2D([], [], marker="o", linestyle="", color=plt.get_cmap("Set1")(i)) for i in range(len(sources))],
        [f"{source} ({(combined.obs['source'] == source).sum()})" for source in sources],
        fontsize=8,
    )
    axes[0].set_title("all cells, by source")

    for axis, source in zip(axes[1:], sources):
        cells = (combined.obs["source"] == source).to_numpy()
        axis.scatter(*umap[~cells].T, s=3, color="0.88")
        point_colors = [colors[condition] for condition in combined.obs["condition"][cells]]
        axis.scatter(*umap[cells].T, s=4, c=point_colors)
        axis.set_title(f"{source}, by condition")
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    for axis in axes[len(sources) + 1 :]:
        axis.set_visible(False)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=color) for color in colors.values()]
    figure.legend(handles, list(colors), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="condition")
    figure.tight_layout()
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return Path(path)


def plot_gene_moments(combined: AnnData, path: str | Path) -> Path:
    """Per-gene mean, variance and zero fraction of each model (y) against the real cells (x), one column per model."""
    sources = combined.obs["source"]
    is_source = {source: (sources == source).to_numpy() for source in sources.cat.categories}
    real = gene_moments(combined.X[is_source.pop(REAL_SOURCE)])
    figure, axes = plt.subplots(3, len(is_source), figsize=(3.6 * len(is_source), 10), squeeze=False)
    for column, (source, cells) in enumerate(is_source.items()):
        generated = gene_moments(combined.X[cells])
        for row, statistic in enumerate(real.columns):
            axis = axes[row, column]
            x, y = real[statistic].to_numpy(), generated[statistic].to_numpy()
            limits = [min(x.min(), y.min()), max(x.max(), y.max())]
            axis.plot(limits, limits, color="0.6", linewidth=1, linestyle="--")
            axis.scatter(x, y, s=5, alpha=0.5)
            r = columnwise_pearson(x[:, None], y[:, None])[0]
            axis.set_title(f"{source}: {statistic} (r = {r:.3f})", fontsize=9)
            axis.set_xlabel(f"real {statistic}")
            axis.set_ylabel(f"generated {statistic}")
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return Path(path)


def marker_genes_of_real(combined: AnnData, n_genes_per_condition: int = 3) -> dict[str, list[str]]:
    """Top Wilcoxon marker genes per condition of the real cells (conditions with at least 2 real cells)."""
    real = combined[combined.obs["source"] == REAL_SOURCE].copy()
    sizes = real.obs["condition"].value_counts()
    groups = sorted(str(condition) for condition in sizes.index[sizes >= 2])
    sc.tl.rank_genes_groups(real, "condition", groups=groups, method="wilcoxon", n_genes=n_genes_per_condition)
    ranked = sc.get.rank_genes_groups_df(real, group=None)
    return {group: ranked.loc[ranked["group"] == group, "names"].tolist() for group in groups}


def plot_marker_dotplot(
    combined: AnnData,
    path: str | Path,
    marker_genes: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """scanpy dot plot of marker genes (default `marker_genes_of_real`) per condition and source."""
    marker_genes = marker_genes_of_real(combined) if marker_genes is None else marker_genes
    obs = combined.obs
    groups = obs["condition"].astype(str) + " · " + obs["source"].astype(str)
    order = obs.sort_values(["condition", "source"]).drop_duplicates(["condition", "source"])
    categories = (order["condition"].astype(str) + " · " + order["source"].astype(str)).tolist()
    combined.obs["group"] = pd.Categorical(groups, categories=categories)
    dotplot = sc.pl.dotplot(combined, marker_genes, groupby="group", show=False, return_fig=True)
    dotplot.savefig(str(path), dpi=DPI)
    plt.close("all")
    return Path(path)
