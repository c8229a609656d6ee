"""Baselines of the perturbation benchmark: each predicts (T, stimulated) from a `Fold` alone (training cells and
T's control cells), as log1p CP10k `[n, G]` over the fold's genes. The two latent-arithmetic baselines sample
counts at the control cells' library sizes, as the scLDM rows do."""

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from scldm_hf.data import encode_dataset
from scldm_hf.evaluation import log_normalize
from scldm_hf.models.modeling_scvae import sample_negative_binomial
from scldm_hf.pipelines import SCLDMPipeline

from .folds import Fold


def no_change(fold: Fold) -> sp.csr_matrix:
    """T's control cells as they are."""
    return fold.control_log


def mean_shift(fold: Fold) -> np.ndarray:
    """T's control cells plus the average over the responding types of (mean stimulated - mean control)."""
    shift = latent_shift(fold, fold.train_log)
    return np.maximum(fold.control_log.toarray() + np.asarray(shift), 0)


def most_similar_type(fold: Fold) -> sp.csr_matrix:
    """The real stimulated cells of the responding type whose control cells' mean is nearest to T's control mean in
    the fold's training-cell PCA."""
    target = fold.pca.transform(fold.control_log).mean(axis=0)
    distances = {cell_type: np.linalg.norm(fold.pca.transform(fold.train_log[fold.cells_of(cell_type, "control")])
                                           .mean(axis=0) - target)
                 for cell_type in fold.responding_types()}
    return fold.train_log[fold.cells_of(min(distances, key=distances.get), "stimulated")]


def latent_shift(fold: Fold, train_latents):
    """scGen's shift: the mean over responding types of (mean stimulated - mean control) of the training cells'
    `train_latents [N, ...]` (a tensor, an array or a sparse matrix)."""
    shifts = [train_latents[fold.cells_of(cell_type, "stimulated")].mean(0)
              - train_latents[fold.cells_of(cell_type, "control")].mean(0) for cell_type in fold.responding_types()]
    return sum(shifts) / len(shifts)


def library_sizes(cells: AnnData) -> torch.Tensor:
    """Total counts `[n]` of `cells`."""
    return torch.as_tensor(np.asarray(cells.X.sum(axis=1)).ravel(), dtype=torch.float32)


def scvi_latent_arithmetic(fold: Fold, seed: int, max_epochs: int | None = None) -> sp.csr_matrix:
    """scGen-style latent arithmetic on scVI: T's control latents plus `latent_shift`, decoded at the control cells'
    library sizes and drawn from the negative binomial.

    scVI at scvi-tools' defaults (10 latents, 128 hidden, `max_epochs=None`: its heuristic, 400 epochs below 20k
    cells; no early stopping) with the upgrades our VAE has: a dispersion per gene and cell (``gene-cell``) and a
    negative binomial likelihood (no zero inflation, like ours).
    """
    import scvi

    scvi.settings.seed = seed
    counts = AnnData(sp.csr_matrix(fold.train.X, dtype=np.float32), var=pd.DataFrame(index=fold.genes))
    scvi.model.SCVI.setup_anndata(counts)
    model = scvi.model.SCVI(counts, dispersion="gene-cell", gene_likelihood="nb")
    model.train(max_epochs=max_epochs)
    shift = latent_shift(fold, torch.as_tensor(model.get_latent_representation()))
    control = AnnData(sp.csr_matrix(fold.control.X, dtype=np.float32), var=pd.DataFrame(index=fold.genes))
    latents = torch.as_tensor(model.get_latent_representation(control)) + shift
    with torch.inference_mode():
        likelihood = model.module.generative(latents, library=library_sizes(fold.control).log()[:, None],
                                             batch_index=torch.zeros(len(latents), 1, dtype=torch.long))
        counts = sample_negative_binomial(likelihood["px"].mu, likelihood["px"].theta,
                                          generator=torch.Generator().manual_seed(seed))
    return log_normalize(sp.csr_matrix(counts.numpy().astype(np.float32)))


def encode(pipeline: SCLDMPipeline, cells: AnnData) -> torch.Tensor:
    """Posterior-mean latents `[n, T, D]` of `cells` under the pipeline's VAE."""
    return torch.from_numpy(encode_dataset(pipeline.vae, cells, show_progress=False))


def decode(pipeline: SCLDMPipeline, latents: torch.Tensor, library_size: torch.Tensor, genes: pd.Index,
           seed: int) -> sp.csr_matrix:
    """log1p CP10k over `genes` of `latents [n, T, D]` decoded by the pipeline's VAE and drawn at `library_size`."""
    counts = pipeline.decode_counts(latents, library_size, torch.Generator().manual_seed(seed))
    return log_normalize(counts[:, pd.Index(pipeline.vae.config.gene_names).get_indexer(genes)])


def vae_latent_arithmetic(pipeline_dir: Path, fold: Fold, seed: int) -> sp.csr_matrix:
    """The same latent arithmetic in our own VAE (the pipeline's at `pipeline_dir`): what the DiT adds over it."""
    pipeline = SCLDMPipeline.from_pretrained(pipeline_dir)
    latents = encode(pipeline, fold.control) + latent_shift(fold, encode(pipeline, fold.train))
    return decode(pipeline, latents, library_sizes(fold.control), fold.genes, seed)


def vae_round_trip(pipeline_dir: Path, stimulated: AnnData, genes: pd.Index, seed: int) -> sp.csr_matrix:
    """Reference, not a prediction: the real held-out cells encoded and decoded by our VAE (the ceiling it sets)."""
    pipeline = SCLDMPipeline.from_pretrained(pipeline_dir)
    cells = stimulated[:, genes]
    return decode(pipeline, encode(pipeline, cells), library_sizes(cells), genes, seed)
