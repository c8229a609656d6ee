import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scldm_hf.data import GeneVocab, anndata_to_corpus, anndata_to_dataset
from scldm_hf.errors import ConditionError, InputDataError, SCLDMError, VocabularyError
from scldm_hf.validation import check_counts, check_vocab_overlap


def with_value(adata: ad.AnnData, row: int, col: int, value) -> ad.AnnData:
    dense = adata.X.toarray().astype(np.float64)
    dense[row, col] = value
    return ad.AnnData(sp.csr_matrix(dense), obs=adata.obs, var=adata.var)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.5, r"X holds non-integer values \(e\.g\. 1\.5 in cell 'cell2'\): this looks log-normalised or scaled: "
              r"pass raw integer counts, e\.g\. layer='counts' or adata\.raw"),
        (-3, r"X holds negative values \(e\.g\. -3 in cell 'cell2'\): counts must be >= 0"),
        (np.nan, r"X holds NaN or infinite values \(first in cell 'cell2'\)"),
        (np.inf, r"X holds NaN or infinite values \(first in cell 'cell2'\)"),
    ],
)
def test_bad_count_values_raise(tiny_adata, value, message):
    with pytest.raises(InputDataError, match=message):
        anndata_to_dataset(with_value(tiny_adata, 2, 1, value))


def test_log_normalised_pbmc_is_rejected(pbmc_counts):
    import scanpy as sc

    log_normalised = pbmc_counts.copy()
    sc.pp.normalize_total(log_normalised, target_sum=1e4)
    sc.pp.log1p(log_normalised)
    with pytest.raises(InputDataError, match="this looks log-normalised or scaled"):
        anndata_to_dataset(log_normalised)


def test_empty_cells_are_counted_and_named(tiny_adata):
    counts = tiny_adata.X.toarray()
    counts[[1, 4]] = 0
    adata = ad.AnnData(sp.csr_matrix(counts), obs=tiny_adata.obs, var=tiny_adata.var)
    with pytest.raises(InputDataError, match=r"2 cells have no counts .*\(first: 'cell1', 'cell4'\).*"
                                             r"scanpy\.pp\.filter_cells\(adata, min_counts=1\)"):
        anndata_to_dataset(adata, chunk_size=2)


def test_duplicate_gene_names_raise(tiny_adata):
    tiny_adata.var_names = ["GA", "GB", "GA", "GD", "GB"]
    with pytest.raises(InputDataError, match=r"2 gene names occur more than once in var_names \(e\.g\. 'GA', 'GB'\): "
                                             r"make them unique with adata\.var_names_make_unique\(\)"):
        anndata_to_dataset(tiny_adata)


def test_missing_covariate_column_lists_available_columns(tiny_adata):
    with pytest.raises(ConditionError, match=r"'donor' not found in adata\.obs; available columns: 'cell_type', 'condition'"):
        anndata_to_dataset(tiny_adata, covariates=["cell_type", "donor"])


def test_nan_covariate_labels_raise(tiny_adata):
    tiny_adata.obs["condition"] = tiny_adata.obs["condition"].where(tiny_adata.obs_names != "cell3")
    with pytest.raises(ConditionError, match=r"'condition' has 1 missing \(NaN\) labels \(first in cells 'cell3'\)"):
        anndata_to_dataset(tiny_adata, covariates=["condition"])


@pytest.mark.parametrize("shape", [(0, 5), (6, 0)])
def test_empty_anndata_raises(shape):
    adata = ad.AnnData(sp.csr_matrix(shape, dtype=np.float32))
    with pytest.raises(InputDataError, match=rf"The AnnData is empty \({shape[0]} cells x {shape[1]} genes\)"):
        anndata_to_dataset(adata)


@pytest.mark.parametrize("dtype", [bool, np.complex64])
def test_unsupported_matrix_dtype_raises(tiny_adata, dtype):
    adata = ad.AnnData(tiny_adata.X.astype(dtype), obs=tiny_adata.obs, var=tiny_adata.var)
    with pytest.raises(InputDataError, match=rf"X has dtype {np.dtype(dtype)}, which cannot hold counts"):
        anndata_to_dataset(adata)


def test_low_vocab_overlap_raises(tiny_adata):
    with pytest.raises(VocabularyError, match=r"Only 0\.5% of the vocabulary genes are measured in the data \(minimum 1\.0%\)"):
        check_vocab_overlap(0.005, 0.01)
    vocab = GeneVocab(["GA"] + [f"ENSG{i:011d}" for i in range(199)])
    with pytest.warns(UserWarning), pytest.raises(VocabularyError, match=r"Only 0\.5% .*Ensembl"):
        anndata_to_dataset(tiny_adata, vocab=vocab, min_vocab_overlap=0.05)


def test_errors_share_the_package_base_class():
    assert issubclass(InputDataError, SCLDMError) and issubclass(InputDataError, ValueError)


def test_check_counts_reads_backed_matrices_chunk_by_chunk(pbmc_counts, tmp_path):
    bad = pbmc_counts.copy()
    bad.X.data[bad.X.indptr[690]] = 2.25
    path = tmp_path / "bad.h5ad"
    bad.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        check_counts(backed.X[:600], backed.obs_names, chunk_size=100)  # the first 600 cells are fine
        with pytest.raises(InputDataError, match=rf"2\.25 in cell '{bad.obs_names[690]}'"):
            check_counts(backed.X, backed.obs_names, chunk_size=100)
    finally:
        backed.file.close()
    with h5py.File(path, "r") as file:
        with pytest.raises(InputDataError, match=rf"2\.25 in cell '{bad.obs_names[690]}'"):
            check_counts(ad.io.sparse_dataset(file["X"]), bad.obs_names, chunk_size=64)


def test_check_counts_accepts_dense_counts_and_names_empty_cells():
    obs_names = pd.Index(["a", "b", "c"])
    check_counts(np.array([[1, 0], [0, 2], [3, 3]], dtype=np.int64), obs_names)
    with pytest.raises(InputDataError, match=r"1 cells have no counts \(first: 'b'\)"):
        check_counts(np.array([[1.0, 0.0], [0.0, 0.0], [3.0, 3.0]]), obs_names, chunk_size=1)


def test_conversion_of_bad_h5ad_leaves_no_folder(tiny_adata, tmp_path):
    path = tmp_path / "negative.h5ad"
    with_value(tiny_adata, 5, 0, -1.0).write_h5ad(path)
    with pytest.raises(InputDataError, match="negative values"):
        anndata_to_corpus(path, tmp_path / "out" / "corpus", chunk_size=2)
    assert list((tmp_path / "out").iterdir()) == []
