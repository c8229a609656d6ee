"""Data layer: gene vocabulary, AnnData -> datasets conversion, batch collation, bundled PBMC data."""

from .collator import CellCollator
from .corpus import CorpusInfo, anndata_to_corpus, anndata_to_dataset, cell_features, load_corpus
from .encoding import encode_dataset
from .datasets_pbmc import load_pbmc68k_counts
from .vocab import GeneVocab

__all__ = [
    "CellCollator",
    "CorpusInfo",
    "GeneVocab",
    "anndata_to_corpus",
    "anndata_to_dataset",
    "cell_features",
    "encode_dataset",
    "load_corpus",
    "load_pbmc68k_counts",
]
