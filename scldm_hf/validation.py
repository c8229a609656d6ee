"""Input checks shared by every entry point (conversion, models, pipeline, CLI).

Each check raises a subclass of :class:`scldm_hf.errors.SCLDMError` whose message names the problem, where it is
(cells, genes, column) and how to fix it. Matrix checks work on one row chunk at a time, so they run on sparse,
dense and backed (on-disk) matrices without densifying the whole matrix.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from numbers import Real

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from .errors import ConditionError, ConfigurationError, InputDataError, VocabularyError

RAW_COUNTS_FIX = "pass raw integer counts, e.g. layer='counts' or adata.raw"
_COUNT_DTYPE_KINDS = "iuf"  # signed/unsigned integers and floats can hold counts


def _examples(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(f"'{name}'" for name in list(names[:n]))


def iter_row_chunks(matrix, chunk_size: int, desc: str | None = None) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Yield ``(start, rows [chunk, n_vars] as CSR)`` over a dense, sparse or backed matrix, ``chunk_size`` rows at a time.

    A tqdm bar is shown when ``desc`` is given.
    """
    n_rows = matrix.shape[0]
    with tqdm(total=n_rows, desc=desc, unit="cells", disable=desc is None) as bar:
        for start in range(0, n_rows, chunk_size):
            rows = matrix[start : start + chunk_size]
            # scipy.sparse has no float16: widen such rows to float32 (exact for every float16 value)
            chunk = sp.csr_matrix(rows, dtype=np.float32 if rows.dtype == np.float16 else None)
            yield start, chunk
            bar.update(chunk.shape[0])


def check_not_empty(n_obs: int, n_vars: int) -> None:
    """Raise ``InputDataError`` if the data has no cells or no genes."""
    if n_obs == 0 or n_vars == 0:
        raise InputDataError(
            f"The AnnData is empty ({n_obs} cells x {n_vars} genes): pass data with at least one cell and one gene "
            "(check the filtering or subsetting that produced it)."
        )


def check_unique_var_names(var_names: Sequence[str]) -> None:
    """Raise ``InputDataError`` if a gene name occurs more than once."""
    names = pd.Index(var_names)
    if not names.is_unique:
        duplicated = names[names.duplicated()].unique()
        raise InputDataError(
            f"{len(duplicated)} gene names occur more than once in var_names (e.g. {_examples(duplicated)}): "
            "make them unique with adata.var_names_make_unique() or sum the duplicated genes."
        )


def check_matrix_dtype(dtype, where: str = "X") -> None:
    """Raise ``InputDataError`` unless ``dtype`` is an integer or float type able to hold counts."""
    dtype = np.dtype(dtype)
    if dtype.kind not in _COUNT_DTYPE_KINDS:
        raise InputDataError(
            f"{where} has dtype {dtype}, which cannot hold counts: store raw counts as integers or floats, "
            f"e.g. adata.X = adata.X.astype(np.float32)."
        )


def _cell_of_value(chunk: sp.csr_matrix, value_index: int, obs_names: Sequence[str]) -> str:
    """Name of the cell holding ``chunk.data[value_index]``."""
    return str(obs_names[np.searchsorted(chunk.indptr, value_index, side="right") - 1])


def check_count_chunk(chunk: sp.csr_matrix, obs_names: Sequence[str], where: str = "X",
                      fix: str = RAW_COUNTS_FIX) -> None:
    """Check that a CSR row chunk ``[n_cells, n_vars]`` holds finite, non-negative integer counts.

    ``obs_names`` are the chunk's cell names, used to say where the first bad value is; `fix` ends the message.
    """
    check_matrix_dtype(chunk.dtype, where)
    values = chunk.data
    if values.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise InputDataError(
                f"{where} holds NaN or infinite values (first in cell {_cell_of_value(chunk, bad[0], obs_names)!r}): "
                f"counts must be finite; {fix}."
            )
    if values.dtype.kind in "if":
        bad = np.flatnonzero(values < 0)
        if bad.size:
            raise InputDataError(
                f"{where} holds negative values (e.g. {values[bad[0]]:g} in cell "
                f"{_cell_of_value(chunk, bad[0], obs_names)!r}): counts must be >= 0, this looks scaled or centred; "
                f"{fix}."
            )
    if values.dtype.kind == "f":
        bad = np.flatnonzero(values != np.round(values))
        if bad.size:
            raise InputDataError(
                f"{where} holds non-integer values (e.g. {values[bad[0]]:g} in cell "
                f"{_cell_of_value(chunk, bad[0], obs_names)!r}): this looks log-normalised or scaled: {fix}."
            )


def check_no_empty_cells(empty_cells: Sequence[str], over: str = "") -> None:
    """Raise ``InputDataError`` naming the cells (``obs_names``) without any count; ``over`` says over which genes."""
    if len(empty_cells):
        raise InputDataError(
            f"{len(empty_cells)} cells have no counts{over} (first: {_examples(empty_cells)}): every cell needs at "
            "least one count. Remove them, e.g. scanpy.pp.filter_cells(adata, min_counts=1)."
        )


def check_counts(matrix, obs_names: Sequence[str], chunk_size: int = 10_000, where: str = "X") -> None:
    """Chunk-wise check that ``matrix`` ``[n_obs, n_vars]`` (dense, sparse or backed) holds raw counts, no empty cells."""
    check_matrix_dtype(matrix.dtype, where)
    empty_cells: list[str] = []
    for start, chunk in iter_row_chunks(matrix, chunk_size):
        names = np.asarray(obs_names[start : start + chunk.shape[0]])
        check_count_chunk(chunk, names, where)
        empty_cells.extend(names[np.diff(chunk.indptr) == 0])
    check_no_empty_cells(empty_cells)


def check_covariate_columns(obs: pd.DataFrame, covariates: Sequence[str]) -> None:
    """Raise ``ConditionError`` if a covariate is not an ``obs`` column or has missing (NaN) labels."""
    missing = [name for name in covariates if name not in obs.columns]
    if missing:
        raise ConditionError(
            f"Covariate column(s) {', '.join(map(repr, missing))} not found in adata.obs; "
            f"available columns: {', '.join(map(repr, obs.columns)) or 'none'}."
        )
    for name in covariates:
        is_missing = obs[name].isna().to_numpy()
        if is_missing.any():
            raise ConditionError(
                f"Covariate column {name!r} has {int(is_missing.sum())} missing (NaN) labels "
                f"(first in cells {_examples(obs.index[is_missing])}): fill them with a label "
                f"(e.g. 'unknown') or drop those cells."
            )


def check_covariate_names(covariates: Sequence[str], reserved: Sequence[str]) -> None:
    """Raise ``ConditionError`` if a covariate would overwrite one of the `reserved` columns of a cell row."""
    clashing = [name for name in covariates if name in reserved]
    if clashing:
        raise ConditionError(
            f"Covariate(s) {', '.join(map(repr, clashing))} have the name of a column every cell row already has "
            f"(reserved: {', '.join(reserved)}), so their labels would replace it: rename the obs column first, e.g. "
            f"adata.obs = adata.obs.rename(columns={{{clashing[0]!r}: '{clashing[0]}_label'}})."
        )


def check_chunk_size(chunk_size) -> None:
    """Raise ``ConfigurationError`` unless ``chunk_size`` (cells per chunk) is a positive integer."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
        raise ConfigurationError(f"chunk_size={chunk_size!r} must be a positive integer (cells per chunk), e.g. 1024.")


def check_vocab_overlap(fraction: float, min_fraction: float) -> None:
    """Raise ``VocabularyError`` if only ``fraction`` of the vocabulary genes are measured (below ``min_fraction``)."""
    if not 0 <= min_fraction <= 1:
        raise ConfigurationError(f"min_vocab_overlap={min_fraction} must be a fraction between 0 and 1 "
                                 "(e.g. --min-vocab-overlap 0.3).")
    if fraction < min_fraction:
        raise VocabularyError(
            f"Only {fraction:.1%} of the vocabulary genes are measured in the data (minimum {min_fraction:.1%}): "
            "the data probably uses other gene identifiers (e.g. Ensembl ids instead of symbols, or another "
            "species). Rename var_names to the vocabulary's identifiers, or lower the minimum if this is intended."
        )


# --- Generation inputs (SCLDMPipeline, CLI) ---


def check_num_cells(num_cells) -> None:
    """Raise ``ConfigurationError`` unless ``num_cells`` is a positive integer."""
    if isinstance(num_cells, bool) or not isinstance(num_cells, (int, np.integer)) or num_cells <= 0:
        raise ConfigurationError(f"num_cells={num_cells!r} must be a positive integer (how many cells to generate).")


def device_memory_bytes(device: torch.device) -> int | None:
    """The whole memory of `device`: GPU memory for CUDA, physical RAM otherwise (None where the OS does not say)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if "SC_PHYS_PAGES" in getattr(os, "sysconf_names", {}):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def check_fits_in_memory(num_bytes: int, device: torch.device, what: str, fix: str) -> None:
    """Raise ``ConfigurationError`` when `num_bytes` (of `what`) exceed the whole memory of `device`, an allocation
    that can only fail."""
    total = device_memory_bytes(device)
    if total is not None and num_bytes > total:
        raise ConfigurationError(
            f"{what} needs {num_bytes / 2**30:.1f} GiB at once, more than the {total / 2**30:.1f} GiB of memory of "
            f"{device}; {fix}"
        )


def check_conditions(conditions, num_cells: int | None = None) -> pd.DataFrame:
    """Normalise generation conditions into a DataFrame ``[N, covariates]`` of string labels.

    ``conditions`` is a DataFrame or a ``{covariate: labels}`` dict with one label per cell (a single string is one
    label). With ``num_cells``, a single row is repeated ``num_cells`` times; other row counts must equal it.
    """
    if isinstance(conditions, pd.DataFrame):
        frame = conditions.reset_index(drop=True)
    elif isinstance(conditions, Mapping):
        columns = {name: [labels] if isinstance(labels, str) else list(labels) for name, labels in conditions.items()}
        lengths = {name: len(labels) for name, labels in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ConditionError(
                f"The condition lists have different lengths {lengths}: give one label per cell for every covariate."
            )
        frame = pd.DataFrame(columns)
    else:
        raise ConditionError(
            f"conditions must be a dict {{covariate: [label, ...]}} or a pandas DataFrame, not "
            f"{type(conditions).__name__}; pass None to generate unconditionally."
        )
    if frame.shape[1] == 0 or len(frame) == 0:
        raise ConditionError(
            f"conditions are empty ({len(frame)} rows x {frame.shape[1]} covariates): give at least one covariate "
            "with one label per cell, or pass None to generate unconditionally."
        )
    if num_cells is not None:
        check_num_cells(num_cells)
        if len(frame) == 1:
            frame = frame.loc[[0] * num_cells].reset_index(drop=True)
        elif len(frame) != num_cells:
            raise ConditionError(
                f"conditions give labels for {len(frame)} cells but num_cells={num_cells}: give one label per cell, "
                "a single label to repeat, or leave num_cells=None."
            )
    for name in frame.columns:
        is_missing = frame[name].isna().to_numpy()
        if is_missing.any():
            raise ConditionError(
                f"Condition column {name!r} has {int(is_missing.sum())} missing labels (first at row "
                f"{int(np.flatnonzero(is_missing)[0])}): give a label for every cell."
            )
    return frame.astype(str)


MAX_GUIDANCE_SCALE = 100.0  # far above useful guidance (1-10); larger weights overflow the NB draw


def check_guidance_scale(guidance_scale, conditioned: Sequence[str]) -> None:
    """Check a classifier-free guidance scale: a number in ``[0, MAX_GUIDANCE_SCALE]``, or ``{covariate: number}``
    naming exactly the ``conditioned`` covariates."""

    def is_number(value) -> bool:
        return isinstance(value, Real) and not isinstance(value, bool) and 0 <= value <= MAX_GUIDANCE_SCALE

    if isinstance(guidance_scale, Mapping):
        if set(guidance_scale) != set(conditioned):
            raise ConfigurationError(
                f"Per-covariate guidance_scale has keys {sorted(guidance_scale)} but the cells are conditioned on "
                f"{sorted(conditioned)}: give one weight per conditioned covariate (0 ignores it)."
            )
        bad = {name: value for name, value in guidance_scale.items() if not is_number(value)}
    else:
        bad = {} if is_number(guidance_scale) else {"guidance_scale": guidance_scale}
    if bad:
        raise ConfigurationError(
            f"guidance_scale values must be numbers from 0 to {MAX_GUIDANCE_SCALE:g}, got {bad}; use e.g. 1.0 "
            "(conditional), 0.0 (unconditional), 2.0 (stronger conditioning) or {'cell_type': 2.0}."
        )


# --- Model inputs (SCVAEModel) ---

_BATCH_FIX = "build batches with CellCollator (docs/DESIGN.md, batch contract)"


def _first_cell(bad: torch.Tensor) -> int:
    """Batch index of the first cell with a True entry in ``bad`` ``[B, ...]``."""
    return int(bad.reshape(bad.shape[0], -1).any(dim=-1).nonzero()[0, 0])


def check_gene_tokens(
    gene_ids: torch.Tensor, counts: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int
) -> None:
    """Check a padded gene-token batch: ``gene_ids`` (integer), ``counts`` and ``attention_mask`` all ``[B, L]``,
    ids in ``0..vocab_size`` (0 = padding, never marked real), finite non-negative counts, >= 1 real token per cell."""
    shapes = {"gene_ids": gene_ids.shape, "counts": counts.shape, "attention_mask": attention_mask.shape}
    shapes = {name: tuple(shape) for name, shape in shapes.items()}
    if gene_ids.dim() != 2 or len(set(shapes.values())) > 1:
        raise InputDataError(f"Gene-token inputs must all be [cells, tokens] of one shape, got {shapes}: {_BATCH_FIX}.")
    if gene_ids.is_floating_point() or gene_ids.dtype == torch.bool:
        raise InputDataError(f"gene_ids must be integer vocabulary ids, got dtype {gene_ids.dtype}: {_BATCH_FIX}.")
    out_of_vocab = (gene_ids < 0) | (gene_ids > vocab_size)
    if out_of_vocab.any():
        raise VocabularyError(
            f"gene_ids hold {int(out_of_vocab.sum())} ids outside 0..{vocab_size} (first in cell "
            f"{_first_cell(out_of_vocab)}): the model knows {vocab_size} genes; map data genes onto the model's "
            "vocabulary, e.g. anndata_to_dataset(adata, vocab=model.gene_vocab)."
        )
    attention_mask = attention_mask.bool()
    padding_marked_real = attention_mask & (gene_ids == 0)
    if padding_marked_real.any():
        raise InputDataError(
            f"attention_mask marks the padding id 0 as a real gene (first in cell {_first_cell(padding_marked_real)}): "
            f"use attention_mask = gene_ids != 0; {_BATCH_FIX}."
        )
    if not torch.isfinite(counts).all():
        raise InputDataError(
            f"counts hold NaN or infinite values (first in cell {_first_cell(~torch.isfinite(counts))}): "
            f"counts must be finite; {RAW_COUNTS_FIX}."
        )
    if (counts < 0).any():
        raise InputDataError(
            f"counts hold negative values (first in cell {_first_cell(counts < 0)}): counts must be >= 0; "
            f"{RAW_COUNTS_FIX}."
        )
    empty = ~attention_mask.any(dim=-1)
    if empty.any():
        raise InputDataError(
            f"{int(empty.sum())} cells have no gene token (first: cell {int(empty.nonzero()[0, 0])}): every cell "
            "needs at least one expressed vocabulary gene; remove empty cells, e.g. "
            "scanpy.pp.filter_cells(adata, min_counts=1)."
        )


def check_decoder_genes(gene_ids: torch.Tensor, batch_size: int, vocab_size: int) -> None:
    """Check genes to decode: non-empty integer ids ``[G]`` or ``[batch_size, G]`` within ``1..vocab_size``."""
    if gene_ids.dim() not in (1, 2) or (gene_ids.dim() == 2 and gene_ids.shape[0] != batch_size):
        raise InputDataError(
            f"Genes to decode must be [genes] or [{batch_size} cells, genes], got shape {tuple(gene_ids.shape)}."
        )
    if gene_ids.shape[-1] == 0 or gene_ids.is_floating_point() or gene_ids.dtype == torch.bool:
        raise InputDataError(
            f"Genes to decode must be a non-empty integer tensor of vocabulary ids, got shape {tuple(gene_ids.shape)} "
            f"and dtype {gene_ids.dtype}."
        )
    invalid = (gene_ids < 1) | (gene_ids > vocab_size)
    if invalid.any():
        raise VocabularyError(
            f"{int(invalid.sum())} genes to decode are not gene ids of the {vocab_size}-gene vocabulary "
            f"(e.g. {int(gene_ids[invalid][0])}); valid ids are 1..{vocab_size} (0 is padding): "
            "use model.gene_vocab.ids_of(gene_names)."
        )


def check_library_size(library_size: torch.Tensor | None, batch_size: int) -> None:
    """Check library sizes: a finite, positive tensor ``[batch_size]``."""
    if library_size is None:
        raise ConfigurationError(
            "library_size is required to decode counts: pass one total count per cell (e.g. batch['library_size'])."
        )
    if tuple(library_size.shape) != (batch_size,):
        raise InputDataError(
            f"library_size must have shape [{batch_size}] (one total per cell), got {tuple(library_size.shape)}."
        )
    bad = ~torch.isfinite(library_size) | (library_size <= 0)
    if bad.any():
        raise InputDataError(
            f"library_size holds {int(bad.sum())} non-positive or non-finite values (first: cell "
            f"{int(bad.nonzero()[0, 0])}): every cell needs a positive total count."
        )


def check_panel_counts(panel_counts: torch.Tensor, expected_shape: tuple[int, ...]) -> None:
    """Check dense target counts: shape ``expected_shape`` (``[B, G]``), finite and non-negative."""
    if tuple(panel_counts.shape) != tuple(expected_shape):
        raise InputDataError(
            f"panel_counts has shape {tuple(panel_counts.shape)} but the decoded panel is {tuple(expected_shape)}: "
            f"panel_counts must hold one count per cell and panel gene; {_BATCH_FIX}."
        )
    bad = ~torch.isfinite(panel_counts) | (panel_counts < 0)
    if bad.any():
        raise InputDataError(
            f"panel_counts hold {int(bad.sum())} negative or non-finite values (first in cell {_first_cell(bad)}): "
            f"{RAW_COUNTS_FIX}."
        )


# --- Value ranges and evaluation labels ---

MAX_COUNT = int(np.iinfo(np.int32).max)  # counts are stored as int32 (docs/DESIGN.md, dataset rows)


def check_count_range(chunk: sp.csr_matrix, obs_names: Sequence[str], where: str = "X",
                      fix: str = RAW_COUNTS_FIX) -> None:
    """Raise ``InputDataError`` if a CSR row chunk ``[n_cells, n_vars]`` holds a count above ``MAX_COUNT``, which the
    int32 count columns cannot store (it would wrap around to a negative or zero count); `fix` ends the message."""
    values = chunk.data
    if values.size and values.dtype.kind in "iuf":
        bad = np.flatnonzero(values > MAX_COUNT)
        if bad.size:
            raise InputDataError(
                f"{where} holds counts above {MAX_COUNT} (e.g. {values[bad[0]]:g} in cell "
                f"{_cell_of_value(chunk, bad[0], obs_names)!r}), more than one gene of one cell can have: the "
                f"matrix is corrupted or not counts; {fix}."
            )


def check_classifier_labels(labels: Sequence[str], name: str, key: str) -> None:
    """Raise ``ConditionError`` unless the cells ``name`` have at least two distinct labels in column ``key``
    (a classifier scored on them needs two classes)."""
    classes = pd.unique(np.asarray(labels))
    if len(classes) < 2:
        raise ConditionError(
            f"The {name} cells have {len(classes)} label(s) in {key!r} ({_examples(list(classes))}): the cell-type "
            f"classifier needs at least two; generate cells of several labels, or pass another cell_type_key."
        )
