"""Covariate vocabularies and the library-size model of an `SCLDMPipeline`.

`CellConditioner` turns human-readable conditions (`{"cell_type": ["B", "NK"]}` or a DataFrame) into the label ids the
`LatentDiTTransformer` consumes, and samples the library size the VAE decoder scales its gene means with: a
log-normal per label combination, optionally shifted by a linear function of the cell's (generated) latent, or the
depth of one of the generated latent's nearest training cells of its labels, since a cell's sequencing depth
follows its state within a label (a pooled atlas most of all). Label
`covariate_labels[name][i]` has id `i`; id `len(covariate_labels[name])` is the null label, as in the transformer.
"""

from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
import torch
from datasets import ClassLabel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..errors import ConditionError, InputDataError
from ..validation import check_conditions

ANY_LABEL = -1  # group_label_ids entry that matches any label (e.g. a covariate added after the library-size fit)
_MAX_LISTED_LABELS = 30
_COLUMN_BATCH_SIZE = 65_536  # rows per read of the label and library-size columns
MAX_REFERENCE_CELLS = 20_000  # training cells the nearest-cell library-size model keeps (a uniform sample beyond)
_NEIGHBOUR_QUERY_CELLS = 1024  # generated cells per block of distances to the reference cells
LibrarySizeBatch = tuple[dict[str, torch.LongTensor], torch.Tensor, torch.Tensor]  # label ids, sizes, features


def add_group_sums(sums: dict[tuple[int, ...], torch.Tensor], covariate_names: list[str],
                   covariates: dict[str, torch.LongTensor], rows: torch.Tensor) -> None:
    """Add each cell's row of `rows [n, S]` to the running sums `[S]` of its label combination in `sums` (keyed by
    label ids in `covariate_names` order; one empty key without covariates), given label ids `{name: [n]}`."""
    if covariate_names:
        label_ids = torch.stack([torch.as_tensor(covariates[name]).long().cpu() for name in covariate_names], 1)
        group_label_ids, group_of_cell = torch.unique(label_ids, dim=0, return_inverse=True)
    else:
        group_label_ids, group_of_cell = torch.zeros(1, 0, dtype=torch.long), torch.zeros(len(rows), dtype=torch.long)
    batch_sums = torch.zeros(len(group_label_ids), rows.shape[1], dtype=rows.dtype).index_add_(0, group_of_cell, rows)
    for key, row_sums in zip(map(tuple, group_label_ids.tolist()), batch_sums):
        sums[key] = sums[key] + row_sums if key in sums else row_sums


def log_library_size(library_size: torch.Tensor) -> torch.Tensor:
    """log of total counts `[n]` (float64), refusing empty cells with the fix."""
    library_size = torch.as_tensor(library_size, dtype=torch.float64).cpu()
    num_empty = int((library_size <= 0).sum())
    if num_empty:
        raise InputDataError(
            f"{num_empty} of {len(library_size)} cells have library size <= 0; a log-normal cannot be fitted. "
            "Remove empty cells first, e.g. scanpy.pp.filter_cells(adata, min_counts=1)."
        )
    return library_size.log()


class LibrarySizeMoments:
    """Running count, mean and variance of log library size per label combination, fed batch by batch, so fitting
    the library-size model of a corpus holds one batch and one row per group, not a column of every cell."""

    def __init__(self, covariate_names: list[str]):
        self.covariate_names = list(covariate_names)
        self.sums: dict[tuple[int, ...], torch.Tensor] = {}  # group label ids -> [cells, sum log, sum log^2]

    def add(self, covariates: dict[str, torch.LongTensor], library_size: torch.Tensor,
            log_offset: torch.Tensor | None = None) -> None:
        """Add cells: label ids `{name: [n]}` of every covariate and total counts `[n]` (> 0); `log_offset [n]`,
        if given, is subtracted from each log library size (the latent model's share, see `CellConditioner`)."""
        log_size = log_library_size(library_size)
        if log_offset is not None:
            log_size = log_size - torch.as_tensor(log_offset, dtype=torch.float64).cpu()
        add_group_sums(self.sums, self.covariate_names, covariates,
                       torch.stack([torch.ones_like(log_size), log_size, log_size**2], 1))

    def groups(self) -> tuple[torch.LongTensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Label ids `[C, K]` (sorted), cell counts `[C]`, log library-size mean and variance `[C]` of the groups.

        A group of a single cell has no variance of its own: it takes the pooled within-group variance of the
        others (so its cells are not all drawn at one depth)."""
        keys = sorted(self.sums)
        sums = torch.stack([self.sums[key] for key in keys])
        num_cells, log_mean = sums[:, 0], sums[:, 1] / sums[:, 0]
        log_var = (sums[:, 2] / num_cells - log_mean**2).clamp_min(0)
        single, measured = num_cells < 2, num_cells >= 2
        if single.any() and measured.any():
            log_var[single] = (num_cells[measured] * log_var[measured]).sum() / num_cells[measured].sum()
        label_ids = torch.tensor(keys, dtype=torch.long).reshape(len(keys), len(self.covariate_names))
        return label_ids, num_cells, log_mean, log_var


class ReferenceCellSample:
    """A uniform random sample of at most `max_cells` training cells (label ids, latent features, log library size),
    fed batch by batch: every cell draws a random key and the cells of the `max_cells` smallest keys are kept (a
    reservoir sample), so a corpus of any size is sampled holding `max_cells` rows and one batch."""

    def __init__(self, covariate_names: list[str], max_cells: int, seed: int = 0):
        self.covariate_names = list(covariate_names)
        self.max_cells = max_cells
        self.generator = torch.Generator().manual_seed(seed)
        self.keys = torch.empty(0, dtype=torch.float64)
        self.label_ids = torch.empty(0, len(self.covariate_names), dtype=torch.long)
        self.features: torch.Tensor | None = None  # [cells, F]
        self.log_library_size = torch.empty(0, dtype=torch.float64)

    def add(self, covariates: dict[str, torch.LongTensor], library_size: torch.Tensor, features: torch.Tensor) -> None:
        """Add cells: label ids `{name: [n]}`, total counts `[n]` (> 0) and latent features `[n, F]`."""
        log_size = log_library_size(library_size)
        features = torch.as_tensor(features, dtype=torch.float32).cpu()
        label_ids = torch.stack([torch.as_tensor(covariates[name]).long().cpu() for name in self.covariate_names], 1) \
            if self.covariate_names else torch.empty(len(log_size), 0, dtype=torch.long)
        keys = torch.rand(len(log_size), generator=self.generator, dtype=torch.float64)
        self.keys = torch.cat([self.keys, keys])
        self.label_ids = torch.cat([self.label_ids, label_ids])
        self.features = features if self.features is None else torch.cat([self.features, features])
        self.log_library_size = torch.cat([self.log_library_size, log_size])
        if len(self.keys) > self.max_cells:
            kept = self.keys.topk(self.max_cells, largest=False).indices.sort().values
            self.keys, self.label_ids = self.keys[kept], self.label_ids[kept]
            self.features, self.log_library_size = self.features[kept], self.log_library_size[kept]


# ridge penalties `fit_latent_library_size` chooses among by generalised cross-validation (standardised features)
RIDGE_CANDIDATES = tuple(float(10.0**exponent) for exponent in np.arange(-2.0, 6.01, 0.25))


class LatentLibrarySizeRegression:
    """Ridge regression of log library size on latent features within label combinations, fed batch by batch.

    Solves `w = (S_ff + ridge * I)^-1 S_fl` with `S_ff [F, F]`, `S_fl [F]` the within-group scatter of the features
    and of features with log library size (each group centred on its own means), so `w` explains the depth that
    varies *inside* a label combination; the groups' own mean depths stay with the per-group log-normal. Holds one
    `[F, F]` matrix and `F + 2` numbers per group, whatever the number of cells.

    The penalty is the one of `RIDGE_CANDIDATES` with the least generalised cross-validation error (Golub, Heath &
    Wahba 1979), computed from the same sums: `GCV = n * RSS / (n - df)^2` over the `n = cells - groups` within-group
    degrees of freedom, `df = tr(S_ff (S_ff + ridge I)^-1)` the fit's effective number of parameters.
    """

    def __init__(self, covariate_names: list[str], num_features: int):
        self.covariate_names = list(covariate_names)
        self.feature_products = torch.zeros(num_features, num_features, dtype=torch.float64)
        self.feature_log_products = torch.zeros(num_features, dtype=torch.float64)
        self.log_squares = torch.zeros((), dtype=torch.float64)
        self.group_sums: dict[tuple[int, ...], torch.Tensor] = {}  # key -> [cells, sum log, sum features [F]]

    def add(self, covariates: dict[str, torch.LongTensor], library_size: torch.Tensor, features: torch.Tensor) -> None:
        """Add cells: label ids `{name: [n]}`, total counts `[n]` (> 0) and latent features `[n, F]`."""
        log_size = log_library_size(library_size)
        features = torch.as_tensor(features, dtype=torch.float64).cpu()
        self.feature_products += features.T @ features
        self.feature_log_products += features.T @ log_size
        self.log_squares += log_size @ log_size
        add_group_sums(self.group_sums, self.covariate_names, covariates,
                       torch.cat([torch.ones_like(log_size)[:, None], log_size[:, None], features], 1))

    def fit(self, ridge: float | None = None) -> tuple[torch.Tensor, float, float]:
        """`(weight [F], ridge, residual variance factor)` (float64): log library size ~ group intercept + features @
        weight, at `ridge` (None: chosen by GCV). The factor `cells / (n - df)` turns the groups' in-sample residual
        variances (the mean squared residual) into unbiased ones (the fit's own cells lie closer to it than new
        cells do)."""
        sums = torch.stack(list(self.group_sums.values()))
        num_cells, log_sums, feature_sums = sums[:, 0], sums[:, 1], sums[:, 2:]
        feature_scatter = self.feature_products - (feature_sums.T / num_cells) @ feature_sums
        feature_log_scatter = self.feature_log_products - feature_sums.T @ (log_sums / num_cells)
        log_scatter = self.log_squares - (log_sums**2 / num_cells).sum()
        degrees_of_freedom = float(num_cells.sum()) - len(num_cells)
        eigenvalues, eigenvectors = torch.linalg.eigh(feature_scatter)
        eigenvalues = eigenvalues.clamp_min(0)
        projected = eigenvectors.T @ feature_log_scatter

        def solution(penalty: float) -> tuple[torch.Tensor, float, float]:
            """(weight, residual degrees of freedom `n - df`, residual sum of squares) at `penalty`."""
            shrink = 1 / (eigenvalues + penalty)
            residual_sum = float(log_scatter - (projected**2 * shrink * (2 - eigenvalues * shrink)).sum())
            remaining = degrees_of_freedom - float((eigenvalues * shrink).sum())
            return eigenvectors @ (projected * shrink), remaining, max(residual_sum, 0.0)

        def gcv(penalty: float) -> float:
            _, remaining, residual_sum = solution(penalty)
            return degrees_of_freedom * residual_sum / remaining**2 if remaining > 0 else np.inf

        if ridge is None:
            ridge = min(RIDGE_CANDIDATES, key=gcv)
        weight, remaining, _ = solution(ridge)
        return weight, ridge, float(num_cells.sum()) / remaining if remaining > 0 else 1.0


class CellConditioner(ModelMixin, ConfigMixin):
    r"""Covariate label vocabularies and a per-condition log-normal library-size model.

    The library-size model keeps, for every combination of labels seen among the training cells (a *group*), the
    number of cells and the mean and variance of their log library size (a group of one cell: the pooled
    within-group variance; persistent buffers, columns in `covariate_names` order):

        group_label_ids [C, K]   group_num_cells [C]   group_log_mean [C]   group_log_var [C]

    Library sizes for given labels are drawn from the log-normal fitted to the pooled cells of the matching groups;
    covariates that are not given (or given as null) match any label, and label combinations never seen in training
    fall back to the fit over all cells.

    With a nearest-cell model (`fit_nearest_library_size`, `num_reference_cells` M > 0) a generated cell takes the
    library size of one of its `library_size_neighbours` nearest reference cells (Euclidean, in the standardised,
    flattened latent `f [F]`) among those with its labels, as scVI's generated cell keeps the depth of the training
    cell it was sampled from; label combinations without reference cells fall back to the groups' log-normals. The
    reference cells are a uniform sample of at most `MAX_REFERENCE_CELLS` training cells (persistent buffers):

        reference_label_ids [M, K]   reference_features [M, F]   reference_log_library_size [M]

    With a latent model (`fit_latent_library_size`, `num_latent_features` F > 0) the log library size is also
    linear in the cell's standardised, flattened latent `f [F]`: `log L = f @ latent_library_weight + u`, `u` drawn
    from the group's log-normal, whose moments are then those of `log L - f @ latent_library_weight`, the variance
    scaled to unbiased for the regression's effective parameters (`latent_library_weight [F]`, a persistent buffer). Sampling then needs each cell's latent features; their
    offset is clamped to the range the training cells' took (`latent_offset_range [2]`), so a generated latent off
    the training manifold (a high guidance scale) cannot draw an extreme depth.

    Args:
        covariate_labels (`dict[str, list[str]]`, *optional*): The labels of each covariate.
        num_library_size_groups (`int`, defaults to 1): Number `C` of groups (set by `fit_library_size`).
        num_latent_features (`int`, defaults to 0): Length `F` of the latent model's weight; 0: labels only.
        latent_library_ridge (`float`, *optional*): The ridge penalty the latent model was fitted with (set by
            `fit_latent_library_size`; provenance only).
        num_reference_cells (`int`, defaults to 0): Number `M` of reference cells of the nearest-cell model; 0: none.
        num_reference_features (`int`, defaults to 0): Length `F` of their latent features.
        library_size_neighbours (`int`, defaults to 5): How many nearest reference cells a generated cell's library
            size is drawn from (uniformly).
    """

    @register_to_config
    def __init__(self, covariate_labels: dict[str, list[str]] | None = None, num_library_size_groups: int = 1,
                 num_latent_features: int = 0, latent_library_ridge: float | None = None,
                 num_reference_cells: int = 0, num_reference_features: int = 0, library_size_neighbours: int = 5):
        super().__init__()
        covariate_labels = {name: list(labels) for name, labels in (covariate_labels or {}).items()}
        self.register_to_config(covariate_labels=covariate_labels)
        num_covariates = len(covariate_labels)
        self.register_buffer("group_label_ids", torch.zeros(num_library_size_groups, num_covariates, dtype=torch.long))
        self.register_buffer("group_num_cells", torch.ones(num_library_size_groups))
        self.register_buffer("group_log_mean", torch.zeros(num_library_size_groups))
        self.register_buffer("group_log_var", torch.zeros(num_library_size_groups))
        if num_latent_features:
            self.register_buffer("latent_library_weight", torch.zeros(num_latent_features))
            self.register_buffer("latent_offset_range", torch.zeros(2))
        if num_reference_cells:
            self.register_buffer("reference_label_ids", torch.zeros(num_reference_cells, num_covariates,
                                                                    dtype=torch.long))
            self.register_buffer("reference_features", torch.zeros(num_reference_cells, num_reference_features))
            self.register_buffer("reference_log_library_size", torch.zeros(num_reference_cells))

    @property
    def library_size_model(self) -> str:
        """"nearest" (`fit_nearest_library_size`), "latent" (`fit_latent_library_size`) or "labels"."""
        if self.config.num_reference_cells:
            return "nearest"
        return "latent" if self.config.num_latent_features else "labels"

    @property
    def uses_latents(self) -> bool:
        """Whether sampled library sizes depend on the cells' latents (a nearest-cell or latent model)."""
        return self.library_size_model != "labels"

    @property
    def covariate_names(self) -> list[str]:
        """Covariate names, sorted (the column order of `group_label_ids`)."""
        return sorted(self.config.covariate_labels)

    @property
    def num_labels(self) -> dict[str, int]:
        """`{name: number of labels}`, i.e. `LatentDiTTransformer.config.covariate_num_labels`."""
        return {name: len(labels) for name, labels in self.config.covariate_labels.items()}

    @classmethod
    def from_dataset(cls, dataset, covariates: list[str] | None = None) -> "CellConditioner":
        """Labels from the `ClassLabel` columns of a cell `datasets.Dataset` or `IterableDataset` (all of them by
        default) and the library-size model fitted to its `library_size` column (read as numpy, batch by batch)."""
        if covariates is None:
            covariates = [name for name, feature in dataset.features.items() if isinstance(feature, ClassLabel)]
        missing = [name for name in covariates if not isinstance(dataset.features.get(name), ClassLabel)]
        if missing:
            raise ConditionError(
                f"Covariate column(s) {missing} are not ClassLabel columns of the dataset (columns: "
                f"{list(dataset.features)}); convert the data with anndata_to_dataset(..., covariates=[...])."
            )
        conditioner = cls(covariate_labels={name: dataset.features[name].names for name in covariates})
        moments = LibrarySizeMoments(covariates)
        for batch in dataset.select_columns([*covariates, "library_size"]).with_format("numpy").iter(
                batch_size=_COLUMN_BATCH_SIZE):
            moments.add({name: torch.as_tensor(batch[name]) for name in covariates},
                        torch.as_tensor(batch["library_size"]))
        conditioner.set_library_size_groups(*moments.groups())
        return conditioner

    def fit_library_size(self, covariates: dict[str, torch.LongTensor], library_size: torch.Tensor) -> None:
        """Fit the log-normal of every label combination to training cells.

        Args:
            covariates (`dict[str, torch.LongTensor [N]]`): Label ids of every covariate.
            library_size (`torch.Tensor [N]`): Total counts of each cell (> 0).
        """
        self._check_covariate_keys(covariates, require_all=True)
        moments = LibrarySizeMoments(self.covariate_names)
        moments.add(covariates, library_size)
        self.set_library_size_groups(*moments.groups())

    def fit_latent_library_size(self, batches: Callable[[], Iterable[LibrarySizeBatch]],
                                ridge: float | None = None) -> float:
        """Fit the latent model: the within-group ridge regression of log library size on latent features
        (`LatentLibrarySizeRegression`; `ridge` None: chosen by generalised cross-validation), then the groups'
        log-normals of what it leaves, their variances scaled to out-of-sample residuals. Two passes over
        `batches()`, an iterable of `(label ids {name: [n]}, library sizes [n], latent features [n, F])` of the
        training cells (features: standardised latents, flattened, as `SCLDMPipeline` passes them when sampling).
        Returns the ridge used."""
        regression = None
        for covariates, library_size, features in batches():
            self._check_covariate_keys(covariates, require_all=True)
            if regression is None:
                regression = LatentLibrarySizeRegression(self.covariate_names, features.shape[1])
            regression.add(covariates, library_size, features)
        if regression is None:
            raise InputDataError("fit_latent_library_size got no cells; pass the training cells' batches.")
        weight, ridge, variance_factor = regression.fit(ridge)
        moments = LibrarySizeMoments(self.covariate_names)
        lowest, highest = torch.inf, -torch.inf
        for covariates, library_size, features in batches():
            offset = torch.as_tensor(features, dtype=torch.float64) @ weight
            moments.add(covariates, library_size, log_offset=offset)
            lowest, highest = min(lowest, float(offset.min())), max(highest, float(offset.max()))
        self.register_buffer("latent_library_weight", weight.to(self.group_log_mean))
        self.register_buffer("latent_offset_range", torch.tensor([lowest, highest]).to(self.group_log_mean))
        self.register_to_config(num_latent_features=len(weight), latent_library_ridge=ridge)
        label_ids, num_cells, log_mean, log_var = moments.groups()
        self.set_library_size_groups(label_ids, num_cells, log_mean, log_var * variance_factor)
        return ridge

    def fit_nearest_library_size(self, batches: Callable[[], Iterable[LibrarySizeBatch]], num_neighbours: int = 5,
                                 max_cells: int = MAX_REFERENCE_CELLS, seed: int = 0) -> None:
        """Fit the nearest-cell model in two passes over `batches()` (as in `fit_latent_library_size`): keep a uniform
        sample (`seed`) of at most `max_cells` training cells as reference cells, and the groups' log-normals of all
        cells for label combinations without reference cells. Refused on a conditioner with a latent model."""
        if self.config.num_latent_features:
            raise ConditionError("This conditioner already has a latent library-size model; fit the nearest-cell "
                                 "model on a fresh CellConditioner (as refit_library_size_model does).")
        if num_neighbours < 1:
            raise ConditionError(f"num_neighbours must be at least 1, got {num_neighbours}.")
        references = self._sample_reference_cells(batches, max_cells, seed)
        self._set_reference_cells(references.label_ids, references.features, references.log_library_size)
        self.register_to_config(library_size_neighbours=num_neighbours)
        self.fit_library_size_groups(batches)

    def _sample_reference_cells(self, batches: Callable[[], Iterable[LibrarySizeBatch]], max_cells: int,
                                seed: int) -> ReferenceCellSample:
        """A `ReferenceCellSample` of the cells of `batches()` (one pass)."""
        references = ReferenceCellSample(self.covariate_names, max_cells, seed)
        for covariates, library_size, features in batches():
            self._check_covariate_keys(covariates, require_all=True)
            references.add(covariates, library_size, features)
        if references.features is None:
            raise InputDataError("The nearest-cell library-size model got no cells; pass the training cells' batches.")
        return references

    def _set_reference_cells(self, label_ids: torch.LongTensor, features: torch.Tensor,
                             log_library_size: torch.Tensor) -> None:
        """Replace the reference cells: label ids `[M, K]`, latent features `[M, F]`, log library sizes `[M]`."""
        dtype, device = self.group_log_mean.dtype, self.group_log_mean.device
        self.register_buffer("reference_label_ids", label_ids.to(device))
        self.register_buffer("reference_features", features.to(device, dtype))
        self.register_buffer("reference_log_library_size", log_library_size.to(device, dtype))
        self.register_to_config(num_reference_cells=len(label_ids), num_reference_features=features.shape[1])

    def fit_library_size_groups(self, batches: Callable[[], Iterable[LibrarySizeBatch]]) -> None:
        """Refit every group in one pass over `batches()` (as in `fit_latent_library_size`; without a latent model
        the features are not read): `fit_library_size` for cells read batch by batch."""
        self.set_library_size_groups(*self._group_moments(batches))

    def add_library_size_groups(self, batches: Callable[[], Iterable[LibrarySizeBatch]]) -> None:
        """Add the groups of new training cells (one pass over `batches()`, as in `fit_latent_library_size`) to the
        fitted ones, keeping the latent model's weight: fine-tuning on new labels. A nearest-cell model also adds a
        uniform sample of at most `MAX_REFERENCE_CELLS` new cells to its reference cells (a second pass).

        Old groups keep their fits (covariates added since match any label); a label combination present in both old
        and new cells is then sampled from the cell-count-weighted pool of both, as `sample_library_size` pools
        groups. A VAE fine-tuned since keeps the weight (and reference latents) fitted on the old latents (same
        standardised coordinates).
        """
        if self.library_size_model == "nearest":
            new = self._sample_reference_cells(batches, MAX_REFERENCE_CELLS, seed=0)
            self._set_reference_cells(torch.cat([self.reference_label_ids, new.label_ids.to(self.device)]),
                                      torch.cat([self.reference_features, new.features.to(self.reference_features)]),
                                      torch.cat([self.reference_log_library_size,
                                                 new.log_library_size.to(self.reference_log_library_size)]))
        label_ids, num_cells, log_mean, log_var = self._group_moments(batches)
        self.set_library_size_groups(
            torch.cat([self.group_label_ids, label_ids.to(self.device)]),
            torch.cat([self.group_num_cells, num_cells.to(self.group_num_cells)]),
            torch.cat([self.group_log_mean, log_mean.to(self.group_log_mean)]),
            torch.cat([self.group_log_var, log_var.to(self.group_log_var)]),
        )

    def _group_moments(self, batches: Callable[[], Iterable[LibrarySizeBatch]]) -> tuple:
        """`LibrarySizeMoments.groups()` of the cells of `batches()` after the latent model's share."""
        moments = LibrarySizeMoments(self.covariate_names)
        for covariates, library_size, features in batches():
            self._check_covariate_keys(covariates, require_all=True)
            moments.add(covariates, library_size, log_offset=self.latent_log_offset(torch.as_tensor(features)).cpu())
        return moments.groups()

    def latent_log_offset(self, latent_features: torch.Tensor) -> torch.Tensor:
        """The latent model's share `[n]` of log library size for features `[n, F]` (zeros without a latent model)."""
        if not self.config.num_latent_features:
            return torch.zeros(len(latent_features), dtype=self.group_log_mean.dtype, device=self.device)
        self._check_latent_features(latent_features, self.config.num_latent_features)
        offset = latent_features.to(self.device, self.latent_library_weight.dtype) @ self.latent_library_weight
        return offset.clamp(*self.latent_offset_range)  # latents off the training manifold do not extrapolate

    def _check_latent_features(self, latent_features: torch.Tensor, expected: int) -> None:
        if latent_features.ndim != 2 or latent_features.shape[1] != expected:
            raise InputDataError(
                f"latent features of shape {tuple(latent_features.shape)} do not fit the library-size model, which "
                f"takes [cells, {expected}] standardised, flattened latents (vae.normalize_latents(z).flatten(1))."
            )

    def set_library_size_groups(
        self,
        group_label_ids: torch.LongTensor,
        group_num_cells: torch.Tensor,
        group_log_mean: torch.Tensor,
        group_log_var: torch.Tensor,
    ) -> None:
        """Replace the library-size model by `C` groups: label ids `[C, K]` (columns in `covariate_names` order,
        `ANY_LABEL` matches any label), cell counts `[C]` and log library-size mean and variance `[C]`."""
        dtype, device = self.group_log_mean.dtype, self.group_log_mean.device
        self.group_label_ids = torch.as_tensor(group_label_ids, dtype=torch.long).to(device)
        self.group_num_cells = torch.as_tensor(group_num_cells).to(device, dtype)
        self.group_log_mean = torch.as_tensor(group_log_mean).to(device, dtype)
        self.group_log_var = torch.as_tensor(group_log_var).to(device, dtype)
        self.register_to_config(num_library_size_groups=len(self.group_num_cells))

    def encode(
        self, conditions: dict[str, list[str]] | pd.DataFrame, num_cells: int | None = None
    ) -> dict[str, torch.LongTensor]:
        """Label names -> ids `{name: LongTensor [N]}` (see `scldm_hf.validation.check_conditions` for the
        accepted forms). Unknown covariates or labels raise `ConditionError` listing the known ones."""
        frame = check_conditions(conditions, num_cells)
        self._check_covariate_keys(frame, require_all=False)
        label_ids = {}
        for name in frame.columns:
            known = self.config.covariate_labels[name]
            ids = pd.Categorical(frame[name], categories=known).codes
            unknown = frame[name][ids < 0]
            if len(unknown):
                raise ConditionError(
                    f"Unknown label(s) {sorted(map(str, unknown.unique()))} for covariate {name!r} "
                    f"({len(unknown)} cells, first at row {int(np.flatnonzero(ids < 0)[0])}); known labels: "
                    f"{_list_labels(known)}. Use a known label, or add it with `add_condition_labels` and fine-tune."
                )
            label_ids[name] = torch.tensor(ids, dtype=torch.long, device=self.device)
        return label_ids

    def sample_library_size(
        self, covariates: dict[str, torch.LongTensor] | None, num_cells: int, generator: torch.Generator | None = None,
        latent_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draw library sizes `[N]` for cells with label ids `{name: LongTensor [N]}` (missing or null = any) and,
        with a nearest-cell or latent model, their latent features `[N, F]` (see the class docstring).

        Every model draws one standard normal per cell (the nearest-cell model picks the neighbour by its normal
        CDF), so a seeded generation's other random draws do not depend on which library-size model it uses."""
        self._require_latent_features(latent_features)
        noise = torch.randn(num_cells, generator=generator, device=generator.device if generator else "cpu")
        noise = noise.to(self.device, self.group_log_mean.dtype)
        log_mean, log_var = self._group_log_normal(covariates, num_cells)
        log_size = log_mean + log_var.sqrt() * noise
        if self.library_size_model == "nearest":
            log_size = self._nearest_log_library_size(covariates, latent_features, noise, fallback=log_size)
        elif latent_features is not None:
            log_size = log_size + self.latent_log_offset(latent_features)
        return torch.exp(log_size)

    def log_library_size_distribution(
        self, covariates: dict[str, torch.LongTensor] | None, num_cells: int,
        latent_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance `[N]` of the normal log library size of each cell that `sample_library_size` draws
        (label and latent models; the nearest-cell model draws training cells' depths, not a log-normal)."""
        if self.library_size_model == "nearest":
            raise ConditionError("The nearest-cell library-size model draws the depths of training cells, not a "
                                 "log-normal; use sample_library_size.")
        self._require_latent_features(latent_features)
        log_mean, log_var = self._group_log_normal(covariates, num_cells)
        if latent_features is not None:
            log_mean = log_mean + self.latent_log_offset(latent_features)
        return log_mean, log_var

    def _require_latent_features(self, latent_features: torch.Tensor | None) -> None:
        if self.uses_latents and latent_features is None:
            raise ConditionError(
                "This library-size model depends on each cell's latent; pass latent_features "
                "(vae.normalize_latents(latents).flatten(1)), as SCLDMPipeline.sample_counts does."
            )

    def _label_matches(self, covariates: dict[str, torch.LongTensor], num_cells: int,
                       label_ids: torch.LongTensor) -> torch.BoolTensor:
        """`[N, C]`: whether each cell's labels match each row of `label_ids [C, K]` (a missing or null label of the
        cell, or `ANY_LABEL` in the row, matches any label)."""
        matches = torch.ones(num_cells, len(label_ids), dtype=torch.bool, device=self.device)
        for column, name in enumerate(self.covariate_names):
            if name not in covariates:
                continue
            ids = covariates[name].to(self.device)[:, None]
            row_ids = label_ids[:, column]
            matches &= (ids == row_ids) | (ids == self.num_labels[name]) | (row_ids == ANY_LABEL)
        return matches

    def _group_log_normal(self, covariates: dict[str, torch.LongTensor] | None,
                          num_cells: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance `[N]` of the log-normal pooled over the groups matching each cell's labels (all groups
        where none matches)."""
        matches = self._label_matches(covariates or {}, num_cells, self.group_label_ids)
        matches[~matches.any(dim=1)] = True
        weights = matches.to(self.group_num_cells.dtype) * self.group_num_cells
        total = weights.sum(dim=1)
        log_mean = weights @ self.group_log_mean / total
        log_var = weights @ (self.group_log_var + self.group_log_mean**2) / total - log_mean**2
        return log_mean, log_var.clamp_min(0)

    def _nearest_log_library_size(self, covariates: dict[str, torch.LongTensor] | None, latent_features: torch.Tensor,
                                  noise: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """Log library size `[N]` of one of each cell's `library_size_neighbours` nearest reference cells with its
        labels, picked uniformly by the cell's standard normal `noise [N]` (through its CDF); `fallback [N]` for
        cells whose labels no reference cell has. `latent_features [N, F]`; distances in blocks of cells."""
        self._check_latent_features(latent_features, self.config.num_reference_features)
        num_cells = len(latent_features)
        matches = self._label_matches(covariates or {}, num_cells, self.reference_label_ids)
        num_matching = matches.sum(dim=1)
        neighbours = min(self.config.library_size_neighbours, self.config.num_reference_cells)
        choice = (torch.special.ndtr(noise) * num_matching.clamp(max=neighbours)).long()
        choice = torch.minimum(choice, (num_matching - 1).clamp(min=0))
        log_size = fallback.clone()
        features = latent_features.to(self.device, self.reference_features.dtype)
        for block in torch.arange(num_cells, device=self.device).split(_NEIGHBOUR_QUERY_CELLS):
            distances = torch.cdist(features[block], self.reference_features)
            distances[~matches[block]] = torch.inf
            nearest = distances.topk(neighbours, dim=1, largest=False).indices  # [b, neighbours], nearest first
            picked = nearest.gather(1, choice[block, None]).squeeze(1)
            found = num_matching[block] > 0
            log_size[block[found]] = self.reference_log_library_size[picked[found]].to(log_size.dtype)
        return log_size

    def add_labels(self, name: str, labels: list[str]) -> None:
        """Append `labels` to covariate `name`; old label ids are unchanged (their library-size fits too)."""
        self._check_covariate_keys([name], require_all=False)
        labels = [str(label) for label in labels]
        known = self.config.covariate_labels[name]
        clashes = sorted(set(labels) & set(known)) + sorted({label for label in labels if labels.count(label) > 1})
        if clashes or not labels:
            raise ConditionError(
                f"Cannot add labels {labels} to covariate {name!r}: give at least one new label, each once "
                f"(already known or repeated: {clashes})."
            )
        self.register_to_config(covariate_labels={**self.config.covariate_labels, name: known + labels})

    def add_covariate(self, name: str, labels: list[str]) -> None:
        """Add covariate `name` with `labels`. Existing library-size groups (and reference cells) match any of its
        labels until refitted."""
        if name in self.config.covariate_labels:
            raise ConditionError(f"Covariate {name!r} already exists; use `add_labels` to add labels to it.")
        old_names = self.covariate_names
        labels = [str(label) for label in labels]
        self.register_to_config(covariate_labels={**self.config.covariate_labels, name: labels})

        def with_any_label(label_ids: torch.LongTensor) -> torch.LongTensor:
            columns = dict(zip(old_names, label_ids.T))
            columns[name] = torch.full((len(label_ids),), ANY_LABEL, dtype=torch.long, device=label_ids.device)
            return torch.stack([columns[column] for column in self.covariate_names], dim=1)

        self.group_label_ids = with_any_label(self.group_label_ids)
        if self.config.num_reference_cells:
            self.reference_label_ids = with_any_label(self.reference_label_ids)

    def _check_covariate_keys(self, names, require_all: bool) -> None:
        unknown = sorted(set(names) - set(self.covariate_names))
        missing = sorted(set(self.covariate_names) - set(names)) if require_all else []
        if unknown or missing:
            raise ConditionError(
                f"Covariates do not match the model: unknown {unknown}, missing {missing}; the model's covariates are "
                f"{self.covariate_names}."
            )


def _list_labels(labels: list[str]) -> str:
    listed = ", ".join(map(repr, labels[:_MAX_LISTED_LABELS]))
    return listed + (f", ... ({len(labels)} in total)" if len(labels) > _MAX_LISTED_LABELS else "")


__all__ = ["CellConditioner"]
