"""Leave-one-cell-type-out folds of Kang 2018 whose every gene list, PCA and vocabulary comes from training cells.

A fold holds out the (T, stimulated) cells. `Fold.from_cells` splits the cells and builds everything a method may
use from the fold's training cells (all but (T, stimulated)) and T's control cells only; the real stimulated cells
go to `HeldOutCells`, which scores predictions and is never handed to a method.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData
from sklearn.decomposition import PCA

from scldm_hf.evaluation import energy_distance, fit_real_pca, log_normalize, mmd_rbf

LYMPHOID = ["B", "CD4T", "CD8T", "NK"]
MYELOID = ["CD14+Mono", "Dendritic", "FCGR3A+Mono"]
CELL_TYPES = sorted(LYMPHOID + MYELOID)
NUM_DE_GENES = 100


def is_stimulated(obs: pd.DataFrame, cell_types: list[str]) -> np.ndarray:
    """Mask of the stimulated cells of `obs` whose type is in `cell_types`."""
    return (obs["cell_type"].isin(cell_types) & (obs["condition"] == "stimulated")).to_numpy()


def with_counts(cells: AnnData) -> AnnData:
    """`cells` without the empty ones (no counts on these genes)."""
    return cells[np.asarray(cells.X.sum(axis=1)).ravel() > 0]


def split_held_out(cells: AnnData, held_out: list[str]) -> tuple[AnnData, AnnData, AnnData]:
    """`cells` split into training cells (all but the stimulated cells of the `held_out` types), the held-out types'
    control cells and their stimulated cells (all genes)."""
    held = is_stimulated(cells.obs, held_out)
    control = cells.obs["cell_type"].isin(held_out).to_numpy() & ~held
    return cells[~held].copy(), cells[control].copy(), cells[held].copy()


def highly_variable(train: AnnData, num_genes: int) -> pd.Index:
    """The `num_genes` highly variable genes (seurat_v3) of `train`."""
    variable = sc.pp.highly_variable_genes(train, n_top_genes=num_genes, flavor="seurat_v3", inplace=False)
    return train.var_names[variable["highly_variable"].to_numpy()]


@dataclass
class Fold:
    """What every method of one fold sees: the held-out type, its genes (HVGs of the training cells, the vocabulary
    of every model of the fold, pretrained ones included), the training cells `[N, G]` and T's control cells
    `[n, G]` with counts over them, their log1p CP10k, and a 30-PC PCA fitted on the training cells."""

    held_out: str
    genes: pd.Index
    train: AnnData
    control: AnnData
    train_log: sp.csr_matrix
    control_log: sp.csr_matrix
    pca: PCA

    @classmethod
    def from_training_cells(cls, train: AnnData, control: AnnData, held_out: str, num_genes: int,
                            seed: int) -> "Fold":
        """The fold of training cells `train` and T's `control` cells (all genes); nothing else is read."""
        genes = highly_variable(train, num_genes)
        train, control = with_counts(train[:, genes]).copy(), with_counts(control[:, genes]).copy()
        train_log = log_normalize(train.X)
        return cls(held_out, genes, train, control, train_log, log_normalize(control.X), fit_real_pca(train_log, seed=seed))

    @classmethod
    def from_cells(cls, cells: AnnData, held_out: str, num_genes: int, seed: int) -> tuple["Fold", AnnData]:
        """The fold holding out (`held_out`, stimulated) of `cells`, and those held-out cells (all genes)."""
        train, control, stimulated = split_held_out(cells, [held_out])
        return cls.from_training_cells(train, control, held_out, num_genes, seed), stimulated

    @property
    def observational(self) -> AnnData:
        """The control cells of every type (training cells in every fold): what the pretrained pipeline sees."""
        return self.train[(self.train.obs["condition"] == "control").to_numpy()].copy()

    def cells_of(self, cell_type: str, condition: str) -> np.ndarray:
        """Mask of the training cells of `cell_type` in `condition`."""
        return ((self.train.obs["cell_type"] == cell_type) & (self.train.obs["condition"] == condition)).to_numpy()

    def responding_types(self) -> list[str]:
        """The training types with stimulated cells (every type but the held-out one)."""
        return sorted(set(self.train.obs.loc[self.train.obs["condition"] == "stimulated", "cell_type"]))

    def validation_types(self) -> list[str]:
        """The lymphoid and the myeloid training type with the most stimulated cells: their stimulated cells are
        the validation split that guidance is chosen on."""
        stimulated = self.train.obs.loc[self.train.obs["condition"] == "stimulated", "cell_type"].value_counts()
        return [stimulated.reindex(lineage).idxmax() for lineage in (LYMPHOID, MYELOID)]


def de_genes(control_log: sp.csr_matrix, stimulated_log: sp.csr_matrix, genes: pd.Index) -> np.ndarray:
    """Column indices of the top-100 DE genes of real stimulated vs control cells (Wilcoxon, scanpy)."""
    both = AnnData(sp.vstack([control_log, stimulated_log]).tocsr(), var=pd.DataFrame(index=genes))
    labels = ["control"] * control_log.shape[0] + ["stimulated"] * stimulated_log.shape[0]
    both.obs["condition"] = pd.Categorical(labels)
    both.uns["log1p"] = {"base": None}
    sc.tl.rank_genes_groups(both, "condition", groups=["stimulated"], reference="control", method="wilcoxon")
    names = [str(name) for name in both.uns["rank_genes_groups"]["names"]["stimulated"]]
    scores = both.uns["rank_genes_groups"]["scores"]["stimulated"]
    top = np.asarray(names)[np.argsort(-np.abs(scores))[:NUM_DE_GENES]]
    return pd.Index(genes).get_indexer(top)


@dataclass
class HeldOutCells:
    """The real (T, stimulated) cells `[m, G]` (log1p CP10k over the fold's genes) that predictions are scored
    against, T's DE genes, and the fold (its control cells and training-cell PCA)."""

    fold: Fold
    stimulated_log: sp.csr_matrix
    de: np.ndarray

    @classmethod
    def of(cls, fold: Fold, stimulated: AnnData) -> "HeldOutCells":
        stimulated_log = log_normalize(with_counts(stimulated[:, fold.genes]).X)
        return cls(fold, stimulated_log, de_genes(fold.control_log, stimulated_log, fold.genes))

    def score(self, predicted_log) -> dict[str, float]:
        """The benchmark's metrics of one prediction `[n, G]` (log1p CP10k) against the real stimulated cells:
        R^2 of per-gene means (all genes, DE genes), Pearson of the predicted vs real change from T's control mean
        on the DE genes (Δ), MMD^2 and energy distance in the training-cell PCA, and the fraction of DE genes moved
        the right way."""
        predicted_mean = np.asarray(predicted_log.mean(axis=0)).ravel()
        real_mean = np.asarray(self.stimulated_log.mean(axis=0)).ravel()
        control_mean = np.asarray(self.fold.control_log.mean(axis=0)).ravel()
        real_change, predicted_change = (real_mean - control_mean)[self.de], (predicted_mean - control_mean)[self.de]
        real_pcs = self.fold.pca.transform(self.stimulated_log)
        predicted_pcs = self.fold.pca.transform(sp.csr_matrix(predicted_log))
        return {
            "r2_all": np.corrcoef(predicted_mean, real_mean)[0, 1] ** 2,
            "r2_de": np.corrcoef(predicted_mean[self.de], real_mean[self.de])[0, 1] ** 2,
            "delta_pearson": np.corrcoef(predicted_change, real_change)[0, 1] if predicted_change.any() else np.nan,
            "mmd": mmd_rbf(real_pcs, predicted_pcs),
            "energy": energy_distance(real_pcs, predicted_pcs),
            "de_direction": float(np.mean(np.sign(predicted_change) == np.sign(real_change))),
        }
