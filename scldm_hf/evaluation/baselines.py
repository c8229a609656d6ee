"""Reference generators for the comparison table: a naive per-gene negative binomial and scVI.

Both are fitted on training counts with a cell-type column and sample cells for requested labels. Each generated
cell copies a random training cell of its label: its library size (unless library sizes are given) and, for scVI,
its latent posterior.
"""

from abc import ABC, abstractmethod

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from tqdm.auto import tqdm

from ..errors import ConditionError, ConfigurationError
from ..models.modeling_scvae import sample_negative_binomial
from .preprocessing import condition_labels, count_matrix

# Inverse dispersion used for genes whose variance does not exceed their mean (Poisson-like).
POISSON_INVERSE_DISPERSION = 1e6


class CellTypeCountGenerator(ABC):
    """Shared `fit` / `sample` logic; subclasses implement `_fit` and `_negative_binomial`."""

    def __init__(self, label_key: str, batch_size: int = 1024):
        self.label_key = label_key
        self.batch_size = batch_size

    def fit(self, adata: AnnData) -> "CellTypeCountGenerator":
        """Fit on integer counts `adata.X [N, G]` with cell-type labels in `adata.obs[label_key]`."""
        counts = count_matrix(adata, "training data")
        self.gene_names = adata.var_names.copy()
        self.train_labels = condition_labels(adata, self.label_key)
        self.train_library_size = torch.as_tensor(np.asarray(counts.sum(axis=1)).ravel())
        self._fit(counts)
        return self

    def sample(self, labels, library_sizes=None, seed: int = 0) -> AnnData:
        """Integer counts `[len(labels), G]` (CSR float32) for the given cell-type labels.

        `library_sizes [len(labels)]` sets each cell's expected total count; by default it is the library size of
        the training cell the generated cell is drawn from.
        """
        labels = np.asarray(labels, dtype=str)
        generator = torch.Generator().manual_seed(seed)
        cells = self._draw_training_cells(labels, generator)
        if library_sizes is None:
            library_size = self.train_library_size[cells]
        else:
            library_size = torch.as_tensor(np.asarray(library_sizes, dtype=np.float32))
            if library_size.shape != (len(labels),) or not bool((library_size > 0).all()):
                raise ConfigurationError(
                    f"library_sizes must hold one positive number per label ({len(labels)}), got shape "
                    f"{tuple(library_size.shape)} with minimum {float(library_size.min()):g}; pass observed totals."
                )
        chunks = []
        for start in tqdm(range(0, len(labels), self.batch_size), desc=f"sampling {type(self).__name__}"):
            batch = slice(start, start + self.batch_size)
            mean, inverse_dispersion = self._negative_binomial(cells[batch], library_size[batch], generator)
            counts = sample_negative_binomial(mean, inverse_dispersion, generator=generator)
            chunks.append(sp.csr_matrix(counts.numpy().astype(np.float32)))
        cell_names = [f"generated_{i}" for i in range(len(labels))]
        obs = pd.DataFrame({self.label_key: pd.Categorical(labels)}, index=cell_names)
        return AnnData(sp.vstack(chunks).tocsr(), obs=obs, var=pd.DataFrame(index=self.gene_names))

    def library_sizes(self, labels, seed: int = 0) -> torch.Tensor:
        """The library sizes `[len(labels)]` `sample` gives cells of `labels` by default (random training cells')."""
        generator = torch.Generator().manual_seed(seed)
        return self.train_library_size[self._draw_training_cells(np.asarray(labels, dtype=str), generator)]

    def _draw_training_cells(self, labels: np.ndarray, generator: torch.Generator) -> torch.LongTensor:
        """Index `[N]` of a uniformly drawn training cell with the same label as each requested cell."""
        unknown = np.setdiff1d(labels, self.train_labels)
        if len(unknown):
            raise ConditionError(
                f"{len(unknown)} requested labels of '{self.label_key}' were not in the training data "
                f"({list(unknown[:5])}); known labels: {sorted(set(self.train_labels))}."
            )
        cells = torch.empty(len(labels), dtype=torch.long)
        for label in np.unique(labels):
            requested = torch.as_tensor(np.flatnonzero(labels == label))
            candidates = torch.as_tensor(np.flatnonzero(self.train_labels == label))
            cells[requested] = candidates[torch.randint(len(candidates), (len(requested),), generator=generator)]
        return cells

    @abstractmethod
    def _fit(self, counts: sp.csr_matrix) -> None:
        """Fit on training counts `[N, G]`; `self.train_labels` and `self.gene_names` are already set."""

    @abstractmethod
    def _negative_binomial(self, cells, library_size, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """NB mean `[B, G]` and inverse dispersion (`[G]`, `[B, G]`) for training cells `[B]`, library sizes `[B]`."""


class NaiveNBBaseline(CellTypeCountGenerator):
    """Independent negative binomial per gene and cell type, fitted by the method of moments.

    Counts are first scaled to the cell type's mean library size; the mean gives gene proportions (the NB mean of a
    generated cell is `library_size * proportion`) and `theta = mean^2 / (variance - mean)`.
    """

    def _fit(self, counts: sp.csr_matrix) -> None:
        self.label_names, label_index = np.unique(self.train_labels, return_inverse=True)
        self.cell_label_index = torch.as_tensor(label_index)
        proportions, inverse_dispersions = [], []
        for label in range(len(self.label_names)):
            label_counts = counts[label_index == label].toarray().astype(np.float64)
            library_size = label_counts.sum(axis=1, keepdims=True)
            scaled = label_counts / np.maximum(library_size, 1) * library_size.mean()
            mean, variance = scaled.mean(axis=0), scaled.var(axis=0)
            excess = variance - mean
            theta = np.divide(mean**2, excess, out=np.full_like(mean, POISSON_INVERSE_DISPERSION), where=excess > 0)
            proportions.append(mean / mean.sum())
            inverse_dispersions.append(np.clip(theta, 1e-4, POISSON_INVERSE_DISPERSION))
        self.proportions = torch.as_tensor(np.stack(proportions), dtype=torch.float32)  # [labels, G]
        self.inverse_dispersion = torch.as_tensor(np.stack(inverse_dispersions), dtype=torch.float32)  # [labels, G]

    def _negative_binomial(self, cells, library_size, generator):
        label = self.cell_label_index[cells]
        return library_size[:, None].float() * self.proportions[label], self.inverse_dispersion[label]


class ScviGenerator(CellTypeCountGenerator):
    """scVI (scvi-tools) trained on the training counts; a generated cell decodes `z ~ q(z | x)` of a random
    training cell of its type, with an observed library size, and samples the NB.

    Trained at scvi-tools' defaults: ``max_epochs=None`` is its heuristic (fewer epochs for more cells) and no early
    stopping (``SCVI.train``'s default; ``early_stopping=True`` stops on the loss of its held-out 10% of cells, which
    made it a weaker generator on two of three benchmark data sets: benchmarks/RESULTS.md, session 10). scvi-tools
    is an optional dependency (`pip install scldm-hf[bench]`), imported in `fit`.
    """

    def __init__(
        self,
        label_key: str,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        max_epochs: int | None = None,
        early_stopping: bool = False,
        training_batch_size: int = 128,
        seed: int = 0,
        batch_size: int = 1024,
    ):
        super().__init__(label_key, batch_size=batch_size)
        self.model_kwargs = {"n_latent": n_latent, "n_hidden": n_hidden, "n_layers": n_layers, "gene_likelihood": "nb"}
        self.max_epochs = max_epochs
        self.early_stopping = early_stopping
        self.training_batch_size = training_batch_size
        self.seed = seed

    def _fit(self, counts: sp.csr_matrix) -> None:
        import scvi

        scvi.settings.seed = self.seed
        training = AnnData(counts, var=pd.DataFrame(index=self.gene_names))
        scvi.model.SCVI.setup_anndata(training)
        self.model = scvi.model.SCVI(training, **self.model_kwargs)
        self.model.train(max_epochs=self.max_epochs, batch_size=self.training_batch_size,
                         early_stopping=self.early_stopping)
        self.posterior_mean, self.posterior_std = self.posterior(training)  # [N_train, n_latent] each

    def posterior(self, cells: AnnData) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std `[N, n_latent]` of q(z | x) for the counts of `cells` (same genes as the training data)."""
        counts = AnnData(count_matrix(cells, "cells to encode"), var=pd.DataFrame(index=self.gene_names))
        mean, variance = self.model.get_latent_representation(counts, return_dist=True)
        return torch.as_tensor(mean), torch.as_tensor(variance).sqrt()

    def sample_latents(self, labels, seed: int = 0) -> torch.Tensor:
        """Latents `[len(labels), n_latent]` as `sample` draws them: q(z | x) of a random training cell per label."""
        generator = torch.Generator().manual_seed(seed)
        return self._posterior_sample(self._draw_training_cells(np.asarray(labels, dtype=str), generator), generator)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, library_size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NB mean and inverse dispersion `[B, G]` of `latents [B, n_latent]` at library sizes `[B]`."""
        batch_index = torch.zeros(len(latents), 1, dtype=torch.long)
        likelihood = self.model.module.generative(latents, library=library_size.log()[:, None], batch_index=batch_index)
        return likelihood["px"].mu.cpu(), likelihood["px"].theta.cpu()

    def _posterior_sample(self, cells: torch.LongTensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(self.posterior_mean[cells].shape, generator=generator)
        return self.posterior_mean[cells] + self.posterior_std[cells] * noise

    def _negative_binomial(self, cells, library_size, generator):
        return self.decode(self._posterior_sample(cells, generator), library_size)
