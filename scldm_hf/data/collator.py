"""CellCollator: dataset rows (one per cell) -> the padded batch of docs/DESIGN.md."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import get_worker_info

from ..errors import ConfigurationError
from .corpus import CorpusInfo
from .vocab import GeneVocab


class CellCollator:
    """Collate cell rows into tensors for the models (``DataLoader(collate_fn=CellCollator(...))``).

    Returns ``gene_ids [B, L]``, ``counts [B, L]``, ``attention_mask [B, L]``, ``library_size [B]``,
    ``panel_gene_ids [G]``, ``panel_counts [B, G]`` and, if covariates are given, ``covariates: {name: [B]}``.
    Rows may hold lists or arrays; ``dataset.with_format("numpy")`` skips the slow Python-list conversion.
    ``max_genes`` caps the expressed genes of a cell by random subsampling, seeded by ``seed`` (in DataLoader
    workers by torch's per-worker seed); ``library_size`` and ``panel_counts`` always describe the whole cell.
    """

    def __init__(
        self,
        panel_gene_ids: Sequence[int] | np.ndarray | torch.Tensor,
        covariates: Sequence[str] = (),
        max_genes: int | None = None,
        seed: int = 0,
    ):
        if max_genes is not None and max_genes < 1:
            raise ConfigurationError(f"max_genes must be a positive number of genes or None, got {max_genes}.")
        self.panel_gene_ids = torch.as_tensor(np.sort(np.asarray(panel_gene_ids, dtype=np.int64)))
        if self.panel_gene_ids.numel() and self.panel_gene_ids[0] <= GeneVocab.pad_id:
            raise ConfigurationError("panel_gene_ids must be vocabulary ids >= 1 (0 is the padding id).")
        self.covariates = list(covariates)
        self.max_genes = max_genes
        self.generator = torch.Generator().manual_seed(seed)
        # panel position of every vocab id up to the largest panel id, then one -1 entry for every id outside the panel
        last_id = int(self.panel_gene_ids.max()) if self.panel_gene_ids.numel() else 0
        self._panel_position = torch.full((last_id + 2,), -1, dtype=torch.long)
        self._panel_position[self.panel_gene_ids] = torch.arange(self.panel_gene_ids.numel())

    @classmethod
    def from_corpus_info(
        cls, info: CorpusInfo, covariates: Sequence[str] | None = None, max_genes: int | None = None, seed: int = 0
    ) -> CellCollator:
        """Collator whose panel is the corpus' measured genes; ``covariates=None`` keeps all the corpus' covariates."""
        return cls(info.measured_gene_ids, list(info.covariates) if covariates is None else covariates, max_genes, seed)

    def __call__(self, rows: Sequence[Mapping]) -> dict:
        gene_ids = [torch.as_tensor(np.asarray(row["gene_ids"], dtype=np.int64)) for row in rows]
        counts = [torch.as_tensor(np.asarray(row["counts"], dtype=np.float32)) for row in rows]
        panel_counts = self._panel_counts(gene_ids, counts)
        if self.max_genes is not None:
            kept = [self._subsample(cell_genes.numel()) for cell_genes in gene_ids]
            gene_ids = [cell_genes[keep] for cell_genes, keep in zip(gene_ids, kept)]
            counts = [cell_counts[keep] for cell_counts, keep in zip(counts, kept)]
        padded_gene_ids = pad_sequence(gene_ids, batch_first=True, padding_value=GeneVocab.pad_id)
        batch = {
            "gene_ids": padded_gene_ids,
            "counts": pad_sequence(counts, batch_first=True, padding_value=0.0),
            "attention_mask": padded_gene_ids != GeneVocab.pad_id,
            "library_size": torch.tensor([float(row["library_size"]) for row in rows]),
            "panel_gene_ids": self.panel_gene_ids,
            "panel_counts": panel_counts,
        }
        if self.covariates:
            batch["covariates"] = {name: torch.tensor([int(row[name]) for row in rows]) for name in self.covariates}
        return batch

    def _subsample(self, n_genes: int) -> torch.Tensor:
        """Ascending positions of at most ``max_genes`` of a cell's ``n_genes`` genes, drawn without replacement."""
        if n_genes <= self.max_genes:
            return torch.arange(n_genes)
        # In DataLoader workers a copied generator would repeat the same draws in every worker and epoch; there the
        # global RNG, which torch seeds per worker and epoch from the loader's seed, is used instead.
        generator = self.generator if get_worker_info() is None else None
        return torch.randperm(n_genes, generator=generator)[: self.max_genes].sort().values

    def _panel_counts(self, gene_ids: list[torch.Tensor], counts: list[torch.Tensor]) -> torch.Tensor:
        """Dense counts ``[B, G]`` over the panel; a cell's genes outside the panel are left out."""
        n_panel = self.panel_gene_ids.numel()
        cells = torch.repeat_interleave(torch.arange(len(gene_ids)), torch.tensor([ids.numel() for ids in gene_ids]))
        all_ids = torch.cat(gene_ids).clamp_(max=self._panel_position.numel() - 1)
        position = self._panel_position[all_ids]
        in_panel = position >= 0
        panel_counts = torch.zeros(len(gene_ids) * n_panel)
        panel_counts[cells[in_panel] * n_panel + position[in_panel]] = torch.cat(counts)[in_panel]
        return panel_counts.view(len(gene_ids), n_panel)
