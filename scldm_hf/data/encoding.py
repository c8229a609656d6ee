"""Encoding whole data sets with a VAE: the DataLoader/AnnData plumbing kept out of the modeling file."""

from __future__ import annotations

from collections.abc import Iterator

import anndata as ad
import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .collator import CellCollator
from .corpus import anndata_to_dataset


def encode_batches(
    vae,
    dataset: datasets.Dataset | ad.AnnData,
    batch_size: int = 256,
    collator: CellCollator | None = None,
    show_progress: bool = True,
) -> Iterator[np.ndarray]:
    """Encode the cells of a dataset (rows as in docs/DESIGN.md) or AnnData of counts with `vae` (an `SCVAEModel`),
    in row order, yielding latents `[b, T, D]` per batch of `batch_size` cells.

    Uses posterior means (no sampling). An AnnData is first mapped onto the model's gene vocabulary.
    """
    if isinstance(dataset, ad.AnnData):
        dataset, _ = anndata_to_dataset(dataset, vocab=vae.gene_vocab)
    # encoding decodes nothing, so the default collator builds no panel
    collator = collator or CellCollator(panel_gene_ids=[])
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    for batch in tqdm(loader, desc="Encoding cells", unit="batch", disable=not show_progress):
        with torch.no_grad():
            encoded = vae.encode(
                batch["gene_ids"].to(vae.device),
                batch["counts"].to(vae.device),
                batch["attention_mask"].to(vae.device),
                library_size=batch["library_size"].to(vae.device),
                sample_posterior=False,
            )
        yield encoded.latents.cpu().numpy()


def encode_dataset(vae, dataset: datasets.Dataset | ad.AnnData, **options) -> np.ndarray:
    """Latents `[N, T, D]` of every cell, in memory: :func:`encode_batches` (same `options`: batch_size, collator,
    show_progress) concatenated."""
    return np.concatenate(list(encode_batches(vae, dataset, **options)), axis=0)
