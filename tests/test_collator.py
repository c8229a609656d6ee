import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from scldm_hf.data import CellCollator
from scldm_hf.errors import ConfigurationError

ROWS = [
    {"gene_ids": [2, 5, 7], "counts": [1, 4, 2], "library_size": 9, "condition": 1},
    {"gene_ids": [3], "counts": [6], "library_size": 6, "condition": 0},
    {"gene_ids": [1, 2, 3, 5, 9], "counts": [1, 1, 2, 3, 5], "library_size": 12, "condition": 1},
]


def test_padding_mask_and_panel_counts():
    batch = CellCollator(panel_gene_ids=[5, 1, 2, 3, 7], covariates=["condition"])(ROWS)
    assert batch["gene_ids"].tolist() == [[2, 5, 7, 0, 0], [3, 0, 0, 0, 0], [1, 2, 3, 5, 9]]
    assert batch["counts"].tolist() == [[1, 4, 2, 0, 0], [6, 0, 0, 0, 0], [1, 1, 2, 3, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["panel_gene_ids"].tolist() == [1, 2, 3, 5, 7]
    # gene 9 is outside the panel and left out of panel_counts
    assert batch["panel_counts"].tolist() == [[0, 1, 0, 4, 2], [0, 0, 6, 0, 0], [1, 1, 2, 3, 0]]
    assert batch["library_size"].tolist() == [9.0, 6.0, 12.0]
    assert batch["covariates"]["condition"].tolist() == [1, 0, 1]
    assert batch["gene_ids"].dtype == torch.long and batch["counts"].dtype == torch.float32
    assert batch["attention_mask"].dtype == torch.bool and batch["panel_counts"].dtype == torch.float32


def test_no_covariates_key_without_covariates():
    assert "covariates" not in CellCollator([1, 2, 3])(ROWS)


def test_max_genes_subsamples_reproducibly_and_keeps_library_size():
    rows = [{"gene_ids": list(range(1, 41)), "counts": list(range(101, 141)), "library_size": 4820}] * 4
    batch = CellCollator(range(1, 41), max_genes=8, seed=3)(rows)
    assert batch["gene_ids"].shape == (4, 8) and batch["attention_mask"].all()
    assert batch["library_size"].tolist() == [4820.0] * 4
    assert batch["panel_counts"].sum(dim=1).tolist() == [4820.0] * 4  # the panel keeps the whole cell
    for ids, counts in zip(batch["gene_ids"], batch["counts"]):
        assert torch.all(ids[1:] > ids[:-1])
        assert torch.equal(counts, (ids + 100).float())  # each kept gene keeps its own count
    assert len({tuple(ids.tolist()) for ids in batch["gene_ids"]}) > 1  # cells draw different genes
    again = CellCollator(range(1, 41), max_genes=8, seed=3)(rows)
    other_seed = CellCollator(range(1, 41), max_genes=8, seed=4)(rows)
    assert torch.equal(again["gene_ids"], batch["gene_ids"])
    assert not torch.equal(other_seed["gene_ids"], batch["gene_ids"])


def test_max_genes_leaves_short_cells_whole():
    batch = CellCollator([1, 2, 3, 5, 7, 9], max_genes=4)(ROWS[:2])
    assert batch["gene_ids"].tolist() == [[2, 5, 7], [3, 0, 0]]


@pytest.mark.parametrize(("panel", "max_genes"), [([0, 1], None), ([1, 2], 0)])
def test_invalid_arguments_raise(panel, max_genes):
    with pytest.raises(ConfigurationError, match="must be"):
        CellCollator(panel, max_genes=max_genes)


def test_dataloader_over_pbmc_dataset(pbmc_dataset, pbmc_counts):
    dataset, info = pbmc_dataset
    collator = CellCollator.from_corpus_info(info)
    assert collator.covariates == ["cell_type"]
    loader = DataLoader(dataset, batch_size=256, collate_fn=collator)
    batches = list(loader)
    assert [len(b["library_size"]) for b in batches] == [256, 256, 188]
    panel_counts = torch.cat([b["panel_counts"] for b in batches])
    expected = pbmc_counts[:, info.vocab.genes_of(info.measured_gene_ids)].X.toarray()
    np.testing.assert_array_equal(panel_counts.numpy(), expected)
    first = batches[0]
    assert first["gene_ids"].shape[1] == first["attention_mask"].sum(dim=1).max()
    assert torch.equal((first["counts"] * first["attention_mask"]).sum(dim=1), first["library_size"])
    assert first["covariates"]["cell_type"].max() < len(info.covariates["cell_type"])
