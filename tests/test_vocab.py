import json
import warnings

import numpy as np
import pytest

from scldm_hf.data import GeneVocab
from scldm_hf.errors import CheckpointError, VocabularyError


def test_ids_start_after_pad():
    vocab = GeneVocab(["A", "B", "C"])
    assert GeneVocab.pad_id == 0
    assert len(vocab) == 3
    assert vocab.ids_of(["A", "C", "B"]).tolist() == [1, 3, 2]
    assert vocab.genes_of([3, 1]) == ["C", "A"]
    assert "B" in vocab and "Z" not in vocab


def test_unknown_genes_and_invalid_ids_raise():
    vocab = GeneVocab(["A", "B"])
    with pytest.raises(VocabularyError, match=r"1 genes are not in the vocabulary \(e\.g\. Z\)"):
        vocab.ids_of(["A", "Z"])
    with pytest.raises(VocabularyError, match=r"valid ids are 1\.\.2 \(0 is padding\)"):
        vocab.genes_of([0])
    with pytest.raises(VocabularyError, match="valid ids"):
        vocab.genes_of(np.array([3]))


def test_duplicate_genes_raise():
    with pytest.raises(VocabularyError, match=r"lists 1 gene names more than once \(e\.g\. B\)"):
        GeneVocab(["A", "B", "B"])


def test_save_load_roundtrip(tmp_path):
    vocab = GeneVocab(["TP53", "CD3E", "MS4A1"])
    path = vocab.save(tmp_path)
    assert path.name == "gene_vocab.json"
    assert json.loads(path.read_text()) == {"genes": ["TP53", "CD3E", "MS4A1"]}
    assert GeneVocab.load(tmp_path) == vocab
    assert GeneVocab.load(path).genes == vocab.genes
    with pytest.raises(CheckpointError, match="No gene vocabulary file"):
        GeneVocab.load(tmp_path / "missing.json")


def test_from_anndata_ignores_gene_order(tiny_adata):
    shuffled = tiny_adata[:, [4, 2, 0, 3, 1]]
    assert GeneVocab.from_anndata(shuffled) == GeneVocab.from_anndata(tiny_adata)
    assert GeneVocab.from_anndata(tiny_adata).genes == ["GA", "GB", "GC", "GD", "GE"]


def test_map_var_names_warns_once_counting_dropped_genes(tiny_adata, tiny_vocab):
    with pytest.warns(UserWarning) as record:
        ids = tiny_vocab.map_var_names(tiny_adata.var_names)
    assert len(record) == 1
    assert "2 of 5 genes are not in the 5-gene vocabulary" in str(record[0].message)
    # data genes GA GB GC GD GE -> vocab ids (GE=1, GC=3, GB=4), GA and GD unknown
    assert ids.dtype == np.int64
    assert ids.tolist() == [0, 4, 3, 0, 1]


def test_map_var_names_silent_when_all_known(tiny_vocab):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tiny_vocab.map_var_names(["GY", "GE"]).tolist() == [5, 1]
