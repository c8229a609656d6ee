"""Hub atlases in the token/value layout (Tahoe-100M: parquet `expression_data` rows of `genes`/`expressions` plus a
`gene_metadata` table) convert into a corpus, offline from a Hugging Face cache filled by `hub_cache.FakeHubApi`."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_cache import FakeHubApi, use_offline_cache

from scldm_hf.cli import main
from scldm_hf.data import load_corpus
from scldm_hf.data.atlas import TokenValueLayout, token_values_to_corpus
from scldm_hf.errors import ConfigurationError, InputDataError

REPO, LOG_REPO, DUPLICATE_REPO = "scldm-tests/atlas", "scldm-tests/atlas-log1p", "scldm-tests/atlas-duplicates"
CLS_TOKEN = 3  # scGPT's <cls>: absent from the gene table, leads every row with a negative value
UNKNOWN_TOKEN = 99  # a token id the gene table lacks
NUM_CELLS, NUM_GENES = 30, 8
TOKEN_IDS = np.arange(10, 10 + NUM_GENES) * 2  # sparse, non-contiguous token ids
GENE_NAMES = [f"G{name}" for name in "HAGBFCED"]  # table order is not name order
CARD = """---
configs:
- config_name: expression_data
  data_files:
  - split: train
    path: data/train-*.parquet
  default: true
- config_name: gene_metadata
  data_files:
  - split: train
    path: metadata/gene_metadata.parquet
---
"""


def dense_counts() -> np.ndarray:
    """Known counts `[cells, genes]` in gene-table order, every cell with at least one count."""
    counts = np.random.default_rng(0).poisson(1.0, size=(NUM_CELLS, NUM_GENES))
    counts[:, 0] += 1
    return counts


def write_atlas(folder: Path, counts: np.ndarray, gene_names: list[str], log1p: bool = False) -> None:
    """The Tahoe-100M layout: a card with two configs, cell rows in two parquet shards, the gene table."""
    genes, expressions = [], []
    for row in counts:
        expressed = np.flatnonzero(row)[::-1]  # not in token order
        genes.append([CLS_TOKEN, *TOKEN_IDS[expressed], UNKNOWN_TOKEN])
        values = np.log1p(row[expressed]) if log1p else row[expressed]
        expressions.append([-2.0, *values.astype(np.float32), 5.0])
    rows = pa.table({
        "genes": pa.array(genes, pa.list_(pa.int64())), "expressions": pa.array(expressions, pa.list_(pa.float32())),
        "drug": [f"drug{i % 3}" for i in range(NUM_CELLS)], "cell_line_id": [f"CVCL_{i % 2}" for i in range(NUM_CELLS)],
        "BARCODE_SUB_LIB_ID": [f"barcode{i:02d}" for i in range(NUM_CELLS)],
    })
    (folder / "data").mkdir(parents=True)
    (folder / "metadata").mkdir()
    pq.write_table(rows.slice(0, 17), folder / "data" / "train-00000-of-00002.parquet")
    pq.write_table(rows.slice(17), folder / "data" / "train-00001-of-00002.parquet")
    pq.write_table(pa.table({"gene_symbol": gene_names, "ensembl_id": [f"ENSG{i:03d}" for i in range(NUM_GENES)],
                             "token_id": TOKEN_IDS}), folder / "metadata" / "gene_metadata.parquet")
    (folder / "README.md").write_text(CARD)


@pytest.fixture(scope="module")
def atlas_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlas")
    api = FakeHubApi(root / "cache")
    repos = {REPO: {}, LOG_REPO: {"log1p": True}, DUPLICATE_REPO: {"gene_names": ["GA", *GENE_NAMES[1:-1], "GA"]}}
    for repo, options in repos.items():
        folder = root / repo.split("/")[1]
        write_atlas(folder, dense_counts(), **{"gene_names": GENE_NAMES, **options})
        api.create_repo(repo, repo_type="dataset")
        api.upload_folder(repo_id=repo, folder_path=folder, repo_type="dataset")
    return root


@pytest.fixture
def offline_cache(atlas_cache, monkeypatch):
    use_offline_cache(monkeypatch, atlas_cache / "cache")
    return atlas_cache


def test_atlas_converts_to_a_corpus_of_the_same_counts_batch_by_batch(offline_cache, tmp_path):
    info = token_values_to_corpus(REPO, tmp_path / "corpus", covariates=["drug", "cell_line_id"],
                                  layout=TokenValueLayout(cell_id_column="BARCODE_SUB_LIB_ID"), chunk_size=4,
                                  max_shard_size=200)
    dataset, loaded = load_corpus(tmp_path / "corpus")
    assert len(list((tmp_path / "corpus").glob("data-*.arrow"))) > 1
    assert info == loaded and info.genes == sorted(GENE_NAMES) and info.num_cells == NUM_CELLS
    assert info.covariates == {"drug": ["drug0", "drug1", "drug2"], "cell_line_id": ["CVCL_0", "CVCL_1"]}
    assert info.source.startswith(f"hf://datasets/{REPO}@")
    counts = np.zeros((NUM_CELLS, NUM_GENES), dtype=np.int64)
    for cell, row in enumerate(dataset):
        assert row["gene_ids"] == sorted(row["gene_ids"]) and row["cell_id"] == f"barcode{cell:02d}"
        counts[cell, np.asarray(row["gene_ids"]) - 1] = row["counts"]
        assert row["drug"] == cell % 3 and row["library_size"] == sum(row["counts"])
    table_order = [info.genes.index(name) for name in GENE_NAMES]
    np.testing.assert_array_equal(counts[:, table_order], dense_counts())


def test_convert_atlas_command_writes_the_corpus_and_refuses_non_counts(offline_cache, tmp_path, capsys):
    assert main(["convert-atlas", REPO, str(tmp_path / "corpus"), "--covariate", "drug"]) == 0
    dataset, info = load_corpus(tmp_path / "corpus")
    assert dataset[0]["cell_id"] == "0" and list(info.covariates) == ["drug"]
    capsys.readouterr()
    assert main(["convert-atlas", LOG_REPO, str(tmp_path / "log_corpus")]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert error.startswith("error: column 'expressions' of scldm-tests/atlas-log1p (expression_data) holds")
    assert "non-integer values" in error and "(row 0)" in error and "--value-column" in error
    assert main(["convert-atlas", "scldm-tests/not-in-the-cache", str(tmp_path / "corpus")]) == 2
    assert "corpus already exists: choose another output_dir" in capsys.readouterr().err  # checked before the repo
    assert not (tmp_path / "log_corpus").exists()


@pytest.mark.parametrize(("repo", "options", "error", "message"), [
    (DUPLICATE_REPO, {}, InputDataError, r"duplicated names \['GA'\].*--gene-name-column \(e.g. ensembl_id\)"),
    (REPO, {"covariates": ["plate"]}, ConfigurationError, r"no column\(s\) 'plate'; its columns: genes, expressions"),
    (REPO, {"layout": TokenValueLayout(gene_config="genes")}, ConfigurationError,
     r"no config 'genes' with data_files \(configs: 'expression_data', 'gene_metadata'\)"),
])
def test_bad_atlas_layouts_name_the_problem_and_the_fix(offline_cache, tmp_path, repo, options, error, message):
    with pytest.raises(error, match=message):
        token_values_to_corpus(repo, tmp_path / "corpus", **options)


def test_gene_names_can_come_from_another_column(offline_cache, tmp_path):
    info = token_values_to_corpus(DUPLICATE_REPO, tmp_path / "corpus",
                                  layout=TokenValueLayout(gene_name_column="ensembl_id"))
    assert info.genes == [f"ENSG{i:03d}" for i in range(NUM_GENES)]


def test_a_local_copy_of_the_repo_converts_alike(offline_cache, tmp_path):
    from_hub = token_values_to_corpus(REPO, tmp_path / "from_hub")
    local = token_values_to_corpus(str(offline_cache / "atlas"), tmp_path / "local")
    assert local.source == "atlas" and local.genes == from_hub.genes and local.num_cells == from_hub.num_cells
    assert load_corpus(tmp_path / "local")[0][:] == load_corpus(tmp_path / "from_hub")[0][:]
