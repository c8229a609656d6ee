"""Data layer: gene vocabulary, AnnData -> datasets conversion, batch collation, bundled PBMC data."""

from .collator import CellCollator
from .corpus import (
    CorpusInfo,
    anndata_to_corpus,
    anndata_to_dataset,
    cell_features,
    cells_to_corpus,
    cells_to_h5ad,
    load_corpus,
)
from .datasets_pbmc import load_pbmc68k_counts
from .encoding import encode_batches, encode_dataset
from .vocab import GeneVocab

__all__ = [
    "CellCollator",
    "CorpusInfo",
    "GeneVocab",
    "anndata_to_corpus",
    "anndata_to_dataset",
    "cell_features",
    "cells_to_corpus",
    "cells_to_h5ad",
    "encode_batches",
    "encode_dataset",
    "load_corpus",
    "load_pbmc68k_counts",
]
