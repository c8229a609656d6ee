"""Encoding whole data sets with a VAE: the DataLoader/AnnData plumbing kept out of the modeling file."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .collator import CellCollator
from .corpus import anndata_to_dataset


@torch.no_grad()
def _encoded_batches(
    vae,
    dataset: datasets.Dataset | ad.AnnData,
    batch_size: int = 256,
    collator: CellCollator | None = None,
    show_progress: bool = True,
    layer: str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`(latents [b, T, D], library sizes [b])` of consecutive batches of cells, on the model's device."""
    if isinstance(dataset, ad.AnnData):
        dataset, _ = anndata_to_dataset(dataset, vocab=vae.gene_vocab, layer=layer)
    # encoding decodes nothing, so the default collator builds no panel
    collator = collator or CellCollator(panel_gene_ids=[])
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    for batch in tqdm(loader, desc="Encoding cells", unit="batch", disable=not show_progress):
        library_size = batch["library_size"].to(vae.device)
        encoded = vae.encode(
            batch["gene_ids"].to(vae.device),
            batch["counts"].to(vae.device),
            batch["attention_mask"].to(vae.device),
            library_size=library_size,
            sample_posterior=False,
        )
        yield encoded.latents, library_size


def encode_batches(vae, dataset: datasets.Dataset | ad.AnnData, **options) -> Iterator[np.ndarray]:
    """Encode the cells of a dataset (rows as in docs/DESIGN.md) or AnnData of counts with `vae` (an `SCVAEModel`),
    in row order, yielding latents `[b, T, D]` per batch of `batch_size` cells.

    Uses posterior means (no sampling). An AnnData is first mapped onto the model's gene vocabulary, its counts read
    from `X` or from `layers[layer]`. `options`: batch_size, collator, show_progress, layer.
    """
    for latents, _ in _encoded_batches(vae, dataset, **options):
        yield latents.float().cpu().numpy()  # numpy has no bfloat16


def encode_dataset(vae, dataset: datasets.Dataset | ad.AnnData, **options) -> np.ndarray:
    """Latents `[N, T, D]` of every cell, in memory: :func:`encode_batches` (same `options`: batch_size, collator,
    show_progress, layer) concatenated."""
    return np.concatenate(list(encode_batches(vae, dataset, **options)), axis=0)


@torch.no_grad()
def normalized_expression(
    vae,
    adata: ad.AnnData,
    layer: str | None = None,
    library_size: float | str = 1.0,
    gene_list: Sequence[str] | None = None,
    batch_size: int = 256,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Decoded expression means `[N, genes]` of the cells of `adata` (counts in `X` or `layers[layer]`), from their
    posterior-mean latents, as scvi-tools' `get_normalized_expression`: at `library_size` counts per cell (1.0 gives
    frequencies summing to 1 over the vocabulary; `"latent"` the cell's own observed total), for the vocabulary
    genes in `gene_list` (default all). Index = `adata.obs_names`, columns = genes."""
    gene_list = list(vae.config.gene_names if gene_list is None else gene_list)
    columns = torch.as_tensor(vae.gene_vocab.ids_of(gene_list) - 1, device=vae.device)
    means = []
    encoded = _encoded_batches(vae, adata, batch_size=batch_size, show_progress=show_progress, layer=layer)
    for latents, observed_total in encoded:
        total = observed_total.float() if library_size == "latent" else torch.full_like(
            observed_total, float(library_size), dtype=torch.float32)
        means.append(vae.decode(latents, library_size=total).mean[:, columns].cpu().numpy())
    return pd.DataFrame(np.concatenate(means, axis=0), index=adata.obs_names.copy(), columns=gene_list)
