"""Per-gene agreement between real and generated cells, on log1p(CP10k) expression `[N, G]` (CSR or dense).

Means and variances are taken of log-normalised expression; the fraction of zeros is the same in counts and in
log space. `*_pearson` is the Pearson r across genes (insensitive to offset and scale); `*_r2` is the coefficient
of determination of the generated statistic as a prediction of the real one (`sklearn.metrics.r2_score`, 1 ideal,
penalises any offset and can be negative).
"""

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.metrics import r2_score
from sklearn.utils.sparsefuncs import mean_variance_axis


def columnwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r between matching columns of `a [N, G]` and `b [N, G]` -> `[G]` (NaN where a column is constant)."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denominator = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    return np.divide((a * b).sum(axis=0), denominator, out=np.full(a.shape[1], np.nan), where=denominator > 0)


def gene_moments(log_expression: sp.spmatrix | np.ndarray) -> pd.DataFrame:
    """Per-gene `mean`, `variance` and `zero_fraction` of log-normalised expression `[N, G]` -> DataFrame `[G, 3]`."""
    matrix = sp.csr_matrix(log_expression, dtype=np.float64)
    mean, variance = mean_variance_axis(matrix, axis=0)
    nonzero_cells = np.bincount(matrix.indices[matrix.data != 0], minlength=matrix.shape[1])
    return pd.DataFrame({"mean": mean, "variance": variance, "zero_fraction": 1 - nonzero_cells / matrix.shape[0]})


def gene_moment_agreement(real_log, generated_log) -> dict[str, float]:
    """Pearson r and R^2 between real and generated per-gene mean, variance and zero fraction."""
    real, generated = gene_moments(real_log), gene_moments(generated_log)
    metrics = {}
    for statistic in real.columns:
        x, y = real[statistic].to_numpy(), generated[statistic].to_numpy()
        metrics[f"{statistic}_pearson"] = float(columnwise_pearson(x[:, None], y[:, None])[0])
        metrics[f"{statistic}_r2"] = float(r2_score(x, y))
    return metrics


def gene_correlation_agreement(real_log, generated_log, n_top_genes: int = 200) -> float:
    """Pearson r between the upper triangles of the real and generated gene-gene correlation matrices.

    Uses the `n_top_genes` genes with the highest real variance; a gene that is constant in one set has no
    correlation and counts as 0 there.
    """
    top_genes = np.argsort(-gene_moments(real_log)["variance"].to_numpy())[:n_top_genes]

    def correlation_matrix(log_expression):
        dense = sp.csr_matrix(log_expression)[:, top_genes].toarray()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # constant genes -> NaN, set to 0 below
            return np.nan_to_num(np.corrcoef(dense, rowvar=False))

    upper = np.triu_indices(len(top_genes), k=1)
    real_corr, generated_corr = correlation_matrix(real_log)[upper], correlation_matrix(generated_log)[upper]
    return float(columnwise_pearson(real_corr[:, None], generated_corr[:, None])[0])
