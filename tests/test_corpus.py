import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from datasets.distributed import split_dataset_by_node

from scldm_hf.data import GeneVocab, anndata_to_corpus, anndata_to_dataset, load_corpus
from scldm_hf.errors import ConditionError, ConfigurationError, InputDataError


def dense_by_vocab(rows, n_vocab: int) -> np.ndarray:
    """Rows -> dense counts ``[N, n_vocab]``, column ``id - 1``."""
    dense = np.zeros((len(rows), n_vocab), dtype=np.int64)
    for i, row in enumerate(rows):
        dense[i, np.asarray(row["gene_ids"]) - 1] = row["counts"]
    return dense


def dense_data(adata: ad.AnnData, vocab: GeneVocab) -> np.ndarray:
    """The AnnData's counts as ``[N, len(vocab)]`` in vocabulary order."""
    return adata[:, vocab.genes].X.toarray().astype(np.int64)


@pytest.fixture(scope="module")
def pbmc_h5ad(pbmc_counts, tmp_path_factory):
    path = tmp_path_factory.mktemp("h5ad") / "pbmc.h5ad"
    pbmc_counts.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def pbmc_corpus(pbmc_h5ad, tmp_path_factory):
    """Backed conversion in 7 chunks of 100 cells, one shard per chunk."""
    output = tmp_path_factory.mktemp("corpora") / "pbmc"
    info = anndata_to_corpus(pbmc_h5ad, output, covariates=["cell_type"], chunk_size=100, max_shard_size=1)
    return output, info


def test_pbmc_counts_recover_the_log_normalised_data(pbmc_counts):
    import scanpy as sc

    reduced = sc.datasets.pbmc68k_reduced()
    assert pbmc_counts.shape == (700, 765)
    assert sp.issparse(pbmc_counts.X) and pbmc_counts.X.format == "csr"
    assert np.array_equal(pbmc_counts.X.data, np.round(pbmc_counts.X.data)) and pbmc_counts.X.data.min() >= 1
    assert list(pbmc_counts.var_names) == list(reduced.raw.var_names)
    assert (pbmc_counts.obs["cell_type"] == reduced.obs["bulk_labels"]).all()
    normalised = pbmc_counts.X.toarray() / reduced.obs["n_counts"].to_numpy()[:, None] * 1e4
    np.testing.assert_allclose(np.log1p(normalised), reduced.raw.X.toarray(), atol=2e-3)


def test_backed_corpus_reproduces_counts_exactly(pbmc_counts, pbmc_corpus):
    output, info = pbmc_corpus
    dataset, loaded_info = load_corpus(output)
    assert loaded_info == info
    vocab = info.vocab
    assert len(dataset) == info.num_cells == 700
    assert dataset["cell_id"] == list(pbmc_counts.obs_names)
    np.testing.assert_array_equal(dense_by_vocab(dataset, len(vocab)), dense_data(pbmc_counts, vocab))
    assert dataset["library_size"] == pbmc_counts.X.sum(axis=1).A1.astype(int).tolist()
    assert all(np.all(np.diff(ids) > 0) for ids in dataset["gene_ids"])


def test_corpus_folder_layout(pbmc_corpus):
    output, info = pbmc_corpus
    assert sorted(p.name for p in output.glob("data-*.arrow")) == [f"data-{i:05d}-of-00007.arrow" for i in range(7)]
    corpus = json.loads((output / "corpus.json").read_text())
    assert set(corpus) == {"genes", "measured_gene_ids", "covariates", "source", "num_cells"}
    assert corpus["measured_gene_ids"] == list(range(1, 766))
    assert corpus["covariates"]["cell_type"][0] == "CD14+ Monocyte"
    assert corpus["source"].endswith("pbmc.h5ad")
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_streaming_gives_the_same_cells(pbmc_corpus):
    dataset, _ = load_corpus(pbmc_corpus[0])
    stream, _ = load_corpus(pbmc_corpus[0], streaming=True)
    assert stream.num_shards == 7
    assert stream.features == dataset.features
    assert list(stream) == dataset.to_list()


@pytest.mark.parametrize("streaming", [False, True])
def test_two_nodes_cover_every_cell_once(pbmc_corpus, streaming):
    dataset, _ = load_corpus(pbmc_corpus[0], streaming=streaming)
    seen = [row["cell_id"] for rank in range(2) for row in split_dataset_by_node(dataset, rank=rank, world_size=2)]
    assert len(seen) == 700 and set(seen) == set(load_corpus(pbmc_corpus[0])[0]["cell_id"])


def test_two_nodes_split_an_even_number_of_shards(pbmc_h5ad, tmp_path):
    anndata_to_corpus(pbmc_h5ad, tmp_path / "c", chunk_size=175, max_shard_size=1)
    stream, _ = load_corpus(tmp_path / "c", streaming=True)
    assert stream.num_shards == 4
    per_node = [[row["cell_id"] for row in split_dataset_by_node(stream, rank=r, world_size=2)] for r in range(2)]
    assert len(per_node[0]) == len(per_node[1]) == 350
    assert not set(per_node[0]) & set(per_node[1])


def test_gene_and_cell_order_do_not_change_rows(pbmc_counts):
    rng = np.random.default_rng(0)
    shuffled = pbmc_counts[rng.permutation(700), rng.permutation(765)].copy()
    reference, info = anndata_to_dataset(pbmc_counts)
    rows, shuffled_info = anndata_to_dataset(shuffled)
    assert shuffled_info.genes == info.genes  # vocab built from sorted gene names
    by_cell = {row["cell_id"]: row for row in rows}
    assert [by_cell[row["cell_id"]] for row in reference] == reference.to_list()
    fixed_vocab_rows, _ = anndata_to_dataset(shuffled, vocab=info.vocab)
    assert fixed_vocab_rows.to_list() == rows.to_list()


def test_vocab_mapping_measured_genes_and_library_size(tiny_adata, tiny_vocab):
    with pytest.warns(UserWarning, match="2 of 5 genes are not in") as record:
        dataset, info = anndata_to_dataset(tiny_adata, vocab=tiny_vocab)
    assert len(record) == 1
    # vocab: GE=1 GX=2 GC=3 GB=4 GY=5; GX and GY are unmeasured, GA and GD dropped
    assert info.measured_gene_ids == [1, 3, 4]
    assert dataset[0] == {"cell_id": "cell0", "gene_ids": [3], "counts": [3], "library_size": 3}
    assert dataset[1]["gene_ids"] == [1, 4] and dataset[1]["counts"] == [5, 2]
    assert dataset["library_size"] == [3, 7, 1, 1, 6, 10]  # GD=7 of cell3 and GA=4 of cell2 are not counted


def test_covariates_become_sorted_class_labels(tiny_dataset):
    dataset, info = tiny_dataset
    assert info.covariates == {"cell_type": ["B", "NK", "T"], "condition": ["ctrl", "stim"]}
    assert dataset.features["cell_type"].names == ["B", "NK", "T"]
    assert dataset["cell_type"] == [2, 0, 2, 1, 0, 2]
    assert dataset["condition"] == [0, 1, 1, 0, 0, 1]


def test_given_label_lists_keep_their_ids(tiny_adata):
    dataset, info = anndata_to_dataset(tiny_adata, covariates={"cell_type": ["T", "B", "NK", "DC"]})
    assert dataset.features["cell_type"].names == ["T", "B", "NK", "DC"]
    assert dataset["cell_type"] == [0, 1, 0, 2, 1, 0]
    with pytest.raises(ConditionError, match=r"labels the given label list does not know: 'NK'; known labels: 'T', 'B'"):
        anndata_to_dataset(tiny_adata, covariates={"cell_type": ["T", "B"]})


def test_layer_is_read_in_memory_and_backed(tiny_adata, tmp_path):
    tiny_adata.layers["counts"] = tiny_adata.X.copy()
    tiny_adata.X = tiny_adata.X.astype(np.float32) / 3.0  # not counts
    expected, _ = anndata_to_dataset(tiny_adata[:, ["GA", "GB", "GC", "GD", "GE"]].copy(), layer="counts")
    path = tmp_path / "tiny.h5ad"
    tiny_adata.write_h5ad(path)
    anndata_to_corpus(path, tmp_path / "corpus", layer="counts")
    assert load_corpus(tmp_path / "corpus")[0].to_list() == expected.to_list()
    with pytest.raises(InputDataError, match=r"Layer 'raw' not found in .*available layers: counts"):
        anndata_to_corpus(path, tmp_path / "other", layer="raw")
    with pytest.raises(InputDataError, match="looks log-normalised"):
        anndata_to_corpus(path, tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "tiny.h5ad"]


def test_failing_conversion_leaves_no_output(pbmc_counts, tmp_path):
    adata = pbmc_counts.copy()
    adata.X.data[adata.X.indptr[650]] = 0.5  # a non-integer value in the last of 7 chunks
    with pytest.raises(InputDataError, match=r"non-integer values \(e\.g\. 0\.5 in cell"):
        anndata_to_corpus(adata, tmp_path / "corpus", chunk_size=100, max_shard_size=1)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tiny_adata, tmp_path):
    anndata_to_corpus(tiny_adata, tmp_path / "corpus")
    with pytest.raises(ConfigurationError, match=r"already exists: choose another output or replace it with overwrite=True \(on the command line: --overwrite\)"):
        anndata_to_corpus(tiny_adata, tmp_path / "corpus")
    info = anndata_to_corpus(tiny_adata[:3].copy(), tmp_path / "corpus", overwrite=True)
    assert info.num_cells == 3 and len(load_corpus(tmp_path / "corpus")[0]) == 3


def test_shared_kang_file_converts_backed(shared_data_dir, tmp_path):
    path = shared_data_dir / "kang2018_pbmc_ifnb_counts.h5ad"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    info = anndata_to_corpus(path, tmp_path / "kang", covariates=["condition", "cell_type"], chunk_size=512)
    dataset, _ = load_corpus(tmp_path / "kang")
    adata = ad.read_h5ad(path)
    assert len(dataset) == adata.n_obs == info.num_cells
    assert set(info.covariates["condition"]) == set(adata.obs["condition"].astype(str))
    assert dataset["library_size"][:50] == adata.X[:50].sum(axis=1).A1.astype(int).tolist()


def test_unsorted_indices_and_explicit_zeros(tiny_adata):
    # cell0 stores GC before GA plus an explicit zero at GB; rows must list nonzero genes in ascending id order
    matrix = sp.csr_matrix((np.array([3, 0, 1, 5]), np.array([2, 1, 0, 4]), np.array([0, 3, 4])), shape=(2, 5))
    assert not matrix.has_sorted_indices
    adata = ad.AnnData(matrix, obs=tiny_adata.obs.iloc[:2], var=tiny_adata.var)
    dataset, _ = anndata_to_dataset(adata)
    assert dataset["gene_ids"] == [[1, 3], [5]]
    assert dataset["counts"] == [[1, 3], [5]]
