"""Preprocessing shared by every metric and plot: counts -> log1p(CP10k) -> PCA fit on the real cells only.

Generated cells are always projected with the PCA fitted on the real cells, so that a model cannot change the
space in which it is judged.
"""

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from anndata import AnnData
from sklearn.decomposition import PCA

from ..errors import InputDataError
from ..validation import check_count_chunk, check_covariate_columns

TARGET_SUM = 1e4


def count_matrix(adata: AnnData, name: str = "adata", layer: str | None = None) -> sp.csr_matrix:
    """`adata.X` (or `adata.layers[layer]`) as a float32 CSR matrix `[N, G]` after checking it holds non-negative
    integer counts."""
    where = f"{name}.X" if layer is None else f"{name}.layers[{layer!r}]"
    if layer is not None and layer not in adata.layers:
        raise InputDataError(f"{name} has no layer {layer!r} (layers: {', '.join(adata.layers) or 'none'}): pass the "
                             "layer holding raw counts, or layer=None for X.")
    counts = sp.csr_matrix(adata.X if layer is None else adata.layers[layer])
    check_count_chunk(counts, adata.obs_names, where=where)
    return counts.astype(np.float32)


def log_normalize(counts: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    """log1p(counts / library_size * 1e4) per cell; `[N, G]` -> CSR `[N, G]` (cells without counts stay 0)."""
    counts = sp.csr_matrix(counts, dtype=np.float32)
    library_size = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(TARGET_SUM, library_size, out=np.zeros_like(library_size), where=library_size > 0)
    normalized = sp.diags(scale) @ counts
    normalized.data = np.log1p(normalized.data)
    return sp.csr_matrix(normalized)


def align_genes(reference: AnnData, other: AnnData, name: str = "generated") -> AnnData:
    """`other` restricted and reordered to `reference.var_names`; raises if any reference gene is missing."""
    missing = reference.var_names.difference(other.var_names)
    if len(missing) > 0:
        raise InputDataError(
            f"{name} lacks {len(missing)} of the {reference.n_vars} genes of the real data (e.g. {list(missing[:5])}); "
            "generate over the same gene panel or subset the real data to the shared genes first."
        )
    return other if other.var_names.equals(reference.var_names) else other[:, reference.var_names]


def condition_labels(adata: AnnData, condition_key: str | Sequence[str]) -> np.ndarray:
    """One string label per cell `[N]`; several keys are joined as `"a | b"` (e.g. cell type and stimulation)."""
    keys = [condition_key] if isinstance(condition_key, str) else list(condition_key)
    check_covariate_columns(adata.obs, keys)
    labels = adata.obs[keys].astype(str)
    return labels.agg(" | ".join, axis=1).to_numpy() if len(keys) > 1 else labels[keys[0]].to_numpy()


def fit_real_pca(real_log: sp.spmatrix, n_components: int = 30, seed: int = 0) -> PCA:
    """PCA fitted on log-normalised real cells `[N, G]` (capped at `min(N, G) - 1` components)."""
    n_components = min(n_components, min(real_log.shape) - 1)
    return PCA(n_components=n_components, svd_solver="arpack", random_state=seed).fit(real_log)


class ReferenceProjection:
    """Counts `[N, G]` -> their first PCs `[N, <=30]`: log1p CP10k projected on a PCA fitted once on
    `reference_counts` (training cells, neither of the sets a distance then compares)."""

    def __init__(self, reference_counts: sp.spmatrix | np.ndarray, seed: int = 0):
        self.pca = fit_real_pca(log_normalize(reference_counts), seed=seed)

    def __call__(self, counts: sp.spmatrix | np.ndarray) -> np.ndarray:
        return self.pca.transform(log_normalize(counts))


def subsample_rows(array: np.ndarray | sp.spmatrix, max_rows: int, rng: np.random.Generator):
    """At most `max_rows` rows of `array`, drawn without replacement (order kept)."""
    if array.shape[0] <= max_rows:
        return array
    return array[np.sort(rng.choice(array.shape[0], size=max_rows, replace=False))]

