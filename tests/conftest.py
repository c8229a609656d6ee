"""Shared fixtures: real PBMC counts, a tiny hand-made AnnData and vocabulary, and their datasets."""

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scldm_hf.data import GeneVocab, anndata_to_dataset, load_pbmc68k_counts

SHARED_DATA_DIR = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def pbmc_counts() -> ad.AnnData:
    """700 x 765 PBMC integer counts (CSR float32) with obs `bulk_labels` / `cell_type`. Do not modify: copy first."""
    return load_pbmc68k_counts()


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """`../shared/data` next to the repository (Kang 2018 and CellTypist count files); skips when it is absent."""
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA_DIR} is absent")
    return SHARED_DATA_DIR


@pytest.fixture(scope="session")
def pbmc_dataset(pbmc_counts):
    """`(datasets.Dataset, CorpusInfo)` of the PBMC counts with the `cell_type` covariate."""
    return anndata_to_dataset(pbmc_counts, covariates=["cell_type"])


@pytest.fixture
def tiny_adata() -> ad.AnnData:
    """6 cells x 5 genes of known counts (CSR int32), obs `cell_type` and `condition`."""
    counts = np.array(
        [
            [1, 0, 3, 0, 0],
            [0, 2, 0, 0, 5],
            [4, 1, 0, 1, 0],
            [0, 0, 1, 7, 0],
            [2, 2, 2, 2, 2],
            [0, 9, 0, 0, 1],
        ],
        dtype=np.int32,
    )
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(["T", "B", "T", "NK", "B", "T"]),
            "condition": ["ctrl", "stim", "stim", "ctrl", "ctrl", "stim"],
        },
        index=[f"cell{i}" for i in range(6)],
    )
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=["GA", "GB", "GC", "GD", "GE"]))


@pytest.fixture
def tiny_vocab() -> GeneVocab:
    """Vocabulary sharing GB, GC, GE with `tiny_adata`, plus two genes it does not measure."""
    return GeneVocab(["GE", "GX", "GC", "GB", "GY"])


@pytest.fixture
def tiny_dataset(tiny_adata):
    """`(datasets.Dataset, CorpusInfo)` of `tiny_adata` with both covariates."""
    return anndata_to_dataset(tiny_adata, covariates=["cell_type", "condition"])


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module (opt in with ``pytestmark = pytest.mark.usefixtures(...)``): tiny
    models train faster on one thread than on two contended ones, and reductions are then bit-reproducible, as in
    the single-threaded training subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
