"""Small real data set bundled with scanpy: 700 PBMCs (68k PBMC subsample) as integer counts, offline."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputDataError

PBMC68K_SHAPE = (700, 765)
MAX_ROUNDING_ERROR = 0.25


def load_pbmc68k_counts() -> ad.AnnData:
    """``scanpy.datasets.pbmc68k_reduced()`` turned back into raw counts: CSR float32 holding integers, 700 x 765.

    ``adata.raw.X`` holds ``log1p(counts / n_counts * 1e4)``, so ``counts = round(expm1(raw.X) * n_counts / 1e4)``.
    ``obs`` has ``bulk_labels`` (10 cell types), also exposed as ``cell_type``; ``var_names`` are the raw genes.
    """
    import scanpy as sc

    reduced = sc.datasets.pbmc68k_reduced()
    log_normalised = sp.csr_matrix(reduced.raw.X, dtype=np.float64)
    log_normalised.data = np.expm1(log_normalised.data)
    scaled = sp.csr_matrix(sp.diags(reduced.obs["n_counts"].to_numpy() / 1e4) @ log_normalised)
    counts = scaled.copy()
    counts.data = np.round(counts.data)
    rounding_error = float(np.abs(scaled.data - counts.data).max(initial=0.0))
    if rounding_error >= MAX_ROUNDING_ERROR:
        raise InputDataError(
            f"Recovering counts from pbmc68k_reduced left values {rounding_error:.2f} away from an integer "
            f"(limit {MAX_ROUNDING_ERROR}): the bundled file is not log1p(counts / n_counts * 1e4); "
            "check the installed scanpy version."
        )
    counts.eliminate_zeros()
    obs = pd.DataFrame(
        {"bulk_labels": reduced.obs["bulk_labels"], "cell_type": reduced.obs["bulk_labels"]}, index=reduced.obs_names
    )
    adata = ad.AnnData(X=counts.astype(np.float32), obs=obs, var=pd.DataFrame(index=reduced.raw.var_names))
    if adata.shape != PBMC68K_SHAPE:
        raise InputDataError(
            f"pbmc68k_reduced has shape {adata.shape}, expected {PBMC68K_SHAPE}; check the installed scanpy version."
        )
    return adata
