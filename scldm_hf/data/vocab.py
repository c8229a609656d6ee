"""Gene vocabulary: gene names <-> integer ids, with id 0 reserved for padding."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from os import PathLike
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, VocabularyError

VOCAB_FILE_NAME = "gene_vocab.json"


class GeneVocab:
    """Ordered gene vocabulary. ``genes[i]`` has id ``i + 1``; id ``0`` is the padding id.

    Embedding tables indexed by these ids have ``len(vocab) + 1`` rows.
    """

    pad_id = 0

    def __init__(self, genes: Iterable[str]):
        self.genes: list[str] = [str(gene) for gene in genes]
        duplicates = [gene for gene, n in Counter(self.genes).items() if n > 1]
        if duplicates:
            raise VocabularyError(
                f"The gene vocabulary lists {len(duplicates)} gene names more than once "
                f"(e.g. {', '.join(duplicates[:5])}); every gene must appear once. "
                "If the names come from an AnnData, call adata.var_names_make_unique() first."
            )
        self._ids = {gene: i + 1 for i, gene in enumerate(self.genes)}

    @classmethod
    def from_anndata(cls, adata) -> GeneVocab:
        """Vocabulary of ``adata.var_names``, sorted so that the column order of the AnnData does not matter."""
        return cls(sorted(map(str, adata.var_names)))

    def __len__(self) -> int:
        return len(self.genes)

    def __contains__(self, gene: object) -> bool:
        return gene in self._ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneVocab) and self.genes == other.genes

    def __repr__(self) -> str:
        return f"GeneVocab({len(self)} genes)"

    def ids_of(self, genes: Iterable[str]) -> np.ndarray:
        """Ids of ``genes`` (int64 ``[N]``); raises ``VocabularyError`` naming the unknown genes."""
        genes = list(genes)
        unknown = [gene for gene in genes if gene not in self._ids]
        if unknown:
            raise VocabularyError(
                f"{len(unknown)} genes are not in the vocabulary (e.g. {', '.join(map(str, unknown[:5]))}); "
                "use vocab.map_var_names(...) to map data genes, dropping unknown ones."
            )
        return np.array([self._ids[gene] for gene in genes], dtype=np.int64)

    def genes_of(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """Gene names of vocabulary ids (``[N]``); the pad id and out-of-range ids raise ``VocabularyError``."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        invalid = ids[(ids < 1) | (ids > len(self))]
        if invalid.size:
            raise VocabularyError(
                f"{invalid.size} ids are not gene ids of this {len(self)}-gene vocabulary "
                f"(e.g. {invalid[:5].tolist()}); valid ids are 1..{len(self)} (0 is padding)."
            )
        return [self.genes[i - 1] for i in ids]

    def map_var_names(self, var_names: Sequence[str]) -> np.ndarray:
        """Vocabulary id of every data gene, int64 ``[n_vars]``, 0 where the gene is not in the vocabulary.

        Unknown genes are dropped with one warning counting them. Vocabulary genes that do not appear in
        ``var_names`` are *unmeasured*.
        """
        ids = np.fromiter((self._ids.get(str(gene), self.pad_id) for gene in var_names), np.int64, len(var_names))
        n_unknown = int((ids == self.pad_id).sum())
        if n_unknown:
            examples = [str(gene) for gene, i in zip(var_names, ids) if i == self.pad_id][:5]
            warnings.warn(
                f"{n_unknown} of {len(ids)} genes are not in the {len(self)}-gene vocabulary and are dropped "
                f"(e.g. {', '.join(examples)}).",
                UserWarning,
                stacklevel=2,
            )
        return ids

    def save(self, path: str | PathLike) -> Path:
        """Write ``{"genes": [...]}`` JSON; a directory ``path`` gets a ``gene_vocab.json`` inside."""
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_FILE_NAME
        path.write_text(json.dumps({"genes": self.genes}))
        return path

    @classmethod
    def load(cls, path: str | PathLike) -> GeneVocab:
        """Read a vocabulary written by :meth:`save` (a JSON file or a directory holding ``gene_vocab.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_FILE_NAME
        if not path.is_file():
            raise CheckpointError(f"No gene vocabulary file at {path}; write one with GeneVocab.save(path).")
        return cls(json.loads(path.read_text())["genes"])
