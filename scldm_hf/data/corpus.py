"""AnnData -> Hugging Face ``datasets``: one row per cell, sparse genes, ClassLabel covariates.

Rows follow the table in docs/DESIGN.md (``cell_id``, ``gene_ids``, ``counts``, ``library_size``, covariates).
Conversion streams row chunks of the count matrix (in memory, or backed straight from an ``.h5ad`` file) into Arrow
record batches, so memory stays bounded by ``chunk_size`` whatever the number of cells.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from os import PathLike
from pathlib import Path

import anndata as ad
import datasets
import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
from datasets.utils.py_utils import convert_file_size_to_int

from ..errors import ConditionError, ConfigurationError, InputDataError
from ..validation import (
    check_count_chunk,
    check_chunk_size,
    check_count_range,
    check_covariate_columns,
    check_covariate_names,
    check_matrix_dtype,
    check_no_empty_cells,
    check_not_empty,
    check_unique_var_names,
    check_vocab_overlap,
    iter_row_chunks,
)
from .hub import resolve_corpus_dir
from .vocab import GeneVocab

CORPUS_FILE_NAME = "corpus.json"
SHARD_GLOB = "data-*.arrow"
DEFAULT_CHUNK_SIZE = 1024
DEFAULT_MAX_SHARD_SIZE = "500MB"
DEFAULT_MIN_VOCAB_OVERLAP = 0.01
STAGING_SUFFIX = ".tmp"
H5AD_REWRITE_FIX = "it is truncated, empty or not an AnnData: write it again with adata.write_h5ad(path)"
# Columns of every cell row (and the latent cache's ``latents``): no covariate may take their names.
RESERVED_COLUMN_NAMES = ("cell_id", "gene_ids", "counts", "library_size", "latents")

Covariates = Sequence[str] | Mapping[str, Sequence[str]]

try:  # glibc: hands freed heap pages back to the OS
    _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
except (OSError, AttributeError, TypeError):
    _malloc_trim = None


def release_freed_memory() -> None:
    """Without this, the per-chunk numpy/scipy temporaries fragment glibc's heap and the peak RSS of a conversion
    creeps up with the number of chunks (+20% from 20k to 200k cells in benchmarks/bench_data.py)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


@dataclass
class CorpusInfo:
    """What a corpus holds besides its rows (``corpus.json``)."""

    genes: list[str]
    measured_gene_ids: list[int]
    covariates: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""
    num_cells: int = 0

    @property
    def vocab(self) -> GeneVocab:
        return GeneVocab(self.genes)

    def save(self, directory: str | PathLike) -> Path:
        path = Path(directory) / CORPUS_FILE_NAME
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def load(cls, directory: str | PathLike) -> CorpusInfo:
        path = Path(directory) / CORPUS_FILE_NAME
        if not path.is_file():
            raise InputDataError(f"{directory} is not a corpus folder (no {CORPUS_FILE_NAME}); build one with anndata_to_corpus.")
        return cls(**json.loads(path.read_text()))


def cell_features(covariate_labels: Mapping[str, Sequence[str]]) -> datasets.Features:
    """Features of a cell row; each covariate is a ClassLabel with the given label names."""
    return datasets.Features(
        {
            "cell_id": datasets.Value("string"),
            "gene_ids": datasets.List(datasets.Value("int32")),
            "counts": datasets.List(datasets.Value("int32")),
            "library_size": datasets.Value("int64"),
            **{name: datasets.ClassLabel(names=list(labels)) for name, labels in covariate_labels.items()},
        }
    )


@dataclass
class _CountSource:
    """A count matrix ``[n_obs, n_vars]`` (dense, sparse or backed) with its cell annotations and gene names."""

    matrix: object
    obs: pd.DataFrame
    var_names: pd.Index
    where: str
    description: str


@contextmanager
def _open_counts(adata_or_path: ad.AnnData | str | PathLike, layer: str | None) -> Iterator[_CountSource]:
    """Open an AnnData's ``X`` (or ``layers[layer]``); an ``.h5ad`` path is read backed, one row chunk at a time.

    For a path only ``obs``, ``var`` and the chosen matrix are touched (``read_h5ad(backed="r")`` would load every
    layer into memory).
    """
    where = "X" if layer is None else f"layers[{layer!r}]"
    if isinstance(adata_or_path, ad.AnnData):
        adata = adata_or_path
        layers = adata.layers
        if layer is not None and layer not in layers:
            raise InputDataError(f"Layer {layer!r} not found; available layers: {', '.join(layers.keys()) or 'none'}.")
        matrix = adata.X if layer is None else layers[layer]
        if matrix is None:
            raise InputDataError("The AnnData has no X: pass layer=... naming the layer that holds raw counts.")
        yield _CountSource(matrix, adata.obs, adata.var_names, where, "in-memory AnnData")
        return
    path = Path(adata_or_path)
    if not path.is_file():
        raise InputDataError(f"No .h5ad file at {path}.")
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise InputDataError(f"{path} cannot be read as .h5ad ({error}); {H5AD_REWRITE_FIX}.") from error
    with file:
        missing = [key for key in ("obs", "var", *(("X",) if layer is None else ())) if key not in file]
        if missing:
            raise InputDataError(f"{path} has no {', '.join(missing)}: it is not an AnnData; {H5AD_REWRITE_FIX}.")
        layers = file.get("layers", {})
        if layer is not None and layer not in layers:
            raise InputDataError(f"Layer {layer!r} not found in {path}; available layers: {', '.join(layers) or 'none'}.")
        element = file["X"] if layer is None else layers[layer]
        matrix = ad.io.sparse_dataset(element) if isinstance(element, h5py.Group) else element
        obs = ad.io.read_elem(file["obs"])
        var_names = ad.io.read_elem(file["var"]).index
        yield _CountSource(matrix, obs, var_names, where, str(path.resolve()))


def covariate_codes(obs: pd.DataFrame, covariates: Covariates) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    """Label names (sorted, unless given) and per-cell ClassLabel ids ``[n_obs]`` of each covariate column."""
    if isinstance(covariates, str):
        covariates = (covariates,)
    check_covariate_names(list(covariates), RESERVED_COLUMN_NAMES)
    check_covariate_columns(obs, list(covariates))
    labels, codes = {}, {}
    for name in covariates:
        values = obs[name].astype(str)
        labels[name] = [str(label) for label in covariates[name]] if isinstance(covariates, Mapping) else sorted(values.unique())
        codes[name] = pd.Categorical(values, categories=labels[name]).codes.astype(np.int64)
        unknown = values[codes[name] < 0].unique()
        if unknown.size:
            raise ConditionError(
                f"Covariate {name!r} has labels the given label list does not know: {', '.join(map(repr, unknown[:5]))}; "
                f"known labels: {', '.join(map(repr, labels[name]))}."
            )
    return labels, codes


class _CellBatches:
    """Validates a count source against the vocabulary and turns its row chunks into Arrow record batches of cells."""

    def __init__(
        self,
        source: _CountSource,
        vocab: GeneVocab | None,
        covariates: Covariates,
        min_vocab_overlap: float,
    ):
        check_not_empty(*source.matrix.shape)
        check_unique_var_names(source.var_names)
        check_matrix_dtype(source.matrix.dtype, source.where)
        vocab = vocab if vocab is not None else GeneVocab.from_anndata(source)
        gene_ids = vocab.map_var_names(source.var_names)
        measured_columns = np.flatnonzero(gene_ids)
        check_vocab_overlap(measured_columns.size / len(vocab), min_vocab_overlap)
        covariate_labels, self._covariate_codes = covariate_codes(source.obs, covariates)

        self.source = source
        # Data columns in ascending vocab id order, genes outside the vocabulary left out (None: already so).
        column_order = measured_columns[np.argsort(gene_ids[measured_columns])]
        self._column_order = None if np.array_equal(column_order, np.arange(len(gene_ids))) else column_order
        self._measured_ids = gene_ids[column_order].astype(np.int32)
        self._obs_names = source.obs.index.astype(str)
        self.features = cell_features(covariate_labels)
        self.info = CorpusInfo(
            genes=vocab.genes,
            measured_gene_ids=self._measured_ids.tolist(),
            covariates=covariate_labels,
            source=source.description,
            num_cells=source.matrix.shape[0],
        )

    def __call__(self, chunk_size: int) -> Iterator[pa.RecordBatch]:
        """Yield record batches of up to ``chunk_size`` cells; raises once the pass has found cells without counts."""
        empty_cells: list[str] = []
        for start, chunk in iter_row_chunks(self.source.matrix, chunk_size, desc="Converting cells"):
            cells = slice(start, start + chunk.shape[0])
            if self._column_order is not None:
                chunk = chunk[:, self._column_order]
            chunk.eliminate_zeros()
            chunk.sort_indices()
            check_count_chunk(chunk, self._obs_names[cells], self.source.where)
            check_count_range(chunk, self._obs_names[cells], self.source.where)
            chunk = chunk.astype(np.int32, copy=False)
            empty_cells.extend(self._obs_names[cells][np.diff(chunk.indptr) == 0])
            labels = {name: codes[cells] for name, codes in self._covariate_codes.items()}
            yield _record_batch(self._obs_names[cells], chunk, self._measured_ids, labels, self.features)
            release_freed_memory()
        check_no_empty_cells(empty_cells, over=f" over the {self._measured_ids.size} measured vocabulary genes")


def _record_batch(cell_ids: Sequence[str], chunk: sp.csr_matrix, column_gene_ids: np.ndarray,
                  covariate_codes: Mapping[str, np.ndarray], features: datasets.Features) -> pa.RecordBatch:
    """Arrow rows of cells: `chunk` is int32 CSR ``[cells, columns]``, `column_gene_ids` the vocab id of each column."""
    offsets = pa.array(chunk.indptr, pa.int32())
    columns = {
        "cell_id": pa.array(cell_ids, pa.string()),
        "gene_ids": pa.ListArray.from_arrays(offsets, pa.array(column_gene_ids[chunk.indices])),
        "counts": pa.ListArray.from_arrays(offsets, pa.array(chunk.data)),
        "library_size": pa.array(np.asarray(chunk.sum(axis=1, dtype=np.int64)).ravel()),
        **{name: pa.array(codes) for name, codes in covariate_codes.items()},
    }
    return pa.RecordBatch.from_pydict(columns, schema=features.arrow_schema)


def anndata_to_dataset(
    adata: ad.AnnData,
    vocab: GeneVocab | None = None,
    covariates: Covariates = (),
    layer: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    min_vocab_overlap: float = DEFAULT_MIN_VOCAB_OVERLAP,
) -> tuple[datasets.Dataset, CorpusInfo]:
    """In-memory ``datasets.Dataset`` of cells (rows as in docs/DESIGN.md) and its :class:`CorpusInfo`.

    ``vocab=None`` builds the vocabulary from ``adata.var_names`` (sorted). ``covariates`` lists ``obs`` columns,
    or maps each to its label names (to reuse a model's label ids). The counts are validated on the way.
    """
    check_chunk_size(chunk_size)
    with _open_counts(adata, layer) as source:
        batches = _CellBatches(source, vocab, covariates, min_vocab_overlap)
        table = pa.Table.from_batches(list(batches(chunk_size)), schema=batches.features.arrow_schema)
    return datasets.Dataset(table), batches.info


def anndata_to_corpus(
    adata_or_path: ad.AnnData | str | PathLike,
    output_dir: str | PathLike,
    vocab: GeneVocab | None = None,
    covariates: Covariates = (),
    layer: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    min_vocab_overlap: float = DEFAULT_MIN_VOCAB_OVERLAP,
    overwrite: bool = False,
) -> CorpusInfo:
    """Write a corpus folder: Arrow shards ``data-XXXXX-of-YYYYY.arrow`` (datasets format) + ``corpus.json``.

    An ``.h5ad`` path is read in backed mode, ``chunk_size`` cells at a time, so memory does not grow with the
    number of cells. Everything is written into a staging folder ``.<name>.<pid>-<random>.tmp`` next to
    ``output_dir`` that is renamed at the end: a conversion that fails (e.g. on invalid counts) leaves no output
    folder behind, and staging folders of processes that died (``kill -9``) are removed by the next conversion.
    An existing ``output_dir`` is replaced only with ``overwrite=True``; of two conversions into the same new folder
    at once, the second to finish fails instead of replacing the first one's corpus.
    """
    check_chunk_size(chunk_size)
    max_shard_bytes = convert_file_size_to_int(max_shard_size)
    with staged_output(output_dir, overwrite) as staging:
        with _open_counts(adata_or_path, layer) as source:
            batches = _CellBatches(source, vocab, covariates, min_vocab_overlap)
            write_arrow_shards(batches(chunk_size), batches.features, staging, max_shard_bytes)
        datasets.DatasetInfo(features=batches.features).write_to_directory(staging)
        batches.info.save(staging)
    return batches.info


def cells_to_corpus(
    batches: Iterable[tuple[Sequence[str], sp.csr_matrix, Mapping[str, np.ndarray]]],
    output_dir: str | PathLike,
    genes: Sequence[str],
    covariate_labels: Mapping[str, Sequence[str]],
    source: str,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> CorpusInfo:
    """Write a corpus folder from batches of ``(cell ids [b], counts CSR [b, genes], {covariate: label ids [b]})``
    as they come (e.g. generated cells): one batch in memory at a time. Staged and committed like
    :func:`anndata_to_corpus`."""
    features = cell_features(covariate_labels)
    gene_ids = np.arange(1, len(genes) + 1, dtype=np.int32)
    num_cells = 0

    def record_batches() -> Iterator[pa.RecordBatch]:
        nonlocal num_cells
        for cell_ids, counts, codes in batches:
            num_cells += len(cell_ids)
            yield _record_batch(cell_ids, counts.astype(np.int32), gene_ids, codes, features)

    with staged_output(output_dir, overwrite) as staging:
        write_arrow_shards(record_batches(), features, staging, convert_file_size_to_int(max_shard_size))
        datasets.DatasetInfo(features=features).write_to_directory(staging)
        info = CorpusInfo(genes=list(genes), measured_gene_ids=gene_ids.tolist(),
                          covariates={name: list(labels) for name, labels in covariate_labels.items()},
                          source=source, num_cells=num_cells)
        info.save(staging)
    return info


def cells_to_h5ad(
    batches: Iterable[tuple[Sequence[str], sp.csr_matrix, Mapping[str, np.ndarray]]],
    path: str | PathLike,
    genes: Sequence[str],
    covariate_labels: Mapping[str, Sequence[str]],
    overwrite: bool = False,
    uns: Mapping | None = None,
) -> int:
    """Write an ``.h5ad`` from batches as for :func:`cells_to_corpus`: the CSR rows are appended to ``X`` on disk
    batch by batch; ``obs`` (cell names and categorical labels of the covariates the batches carry) and ``uns`` are
    written at the end. Written to a staging file beside `path` and renamed when complete; returns the number of
    cells."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigurationError(f"{path} already exists: choose another output or pass overwrite=True (--overwrite).")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{STAGING_SUFFIX}")
    cell_ids, codes = [], {}
    try:
        with h5py.File(staging, "w") as file:
            ad.io.write_elem(file, "X", sp.csr_matrix((0, len(genes)), dtype=np.int32))
            matrix = ad.io.sparse_dataset(file["X"])
            for batch_cell_ids, counts, label_ids in batches:
                matrix.append(counts.astype(np.int32))
                cell_ids.extend(batch_cell_ids)
                for name, ids in label_ids.items():
                    codes.setdefault(name, []).append(ids)
            obs = pd.DataFrame(
                {name: pd.Categorical.from_codes(np.concatenate(ids), categories=list(covariate_labels[name]))
                 for name, ids in codes.items()},
                index=pd.Index(cell_ids),
            )
            ad.io.write_elem(file, "obs", obs)
            ad.io.write_elem(file, "var", pd.DataFrame(index=pd.Index(list(genes), name="gene")))
            ad.io.write_elem(file, "uns", dict(uns or {}))
            file.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        if overwrite:
            staging.replace(path)
        else:
            os.link(staging, path)  # fails, replacing nothing, if another process wrote `path` meanwhile
    finally:
        staging.unlink(missing_ok=True)
    return len(cell_ids)


@contextmanager
def staged_output(output_dir: str | PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A staging folder ``.<name>.<pid>-<random>.tmp`` beside `output_dir`, renamed to `output_dir` when the block
    ends without an error and deleted in any case; staging folders of dead processes are removed first. An existing
    `output_dir` is refused (before any work) unless `overwrite`."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise ConfigurationError(
            f"{output_dir} already exists: choose another output or replace it with overwrite=True "
            "(on the command line: --overwrite)."
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(output_dir)
    staging = output_dir.with_name(f".{output_dir.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{STAGING_SUFFIX}")
    staging.mkdir()
    try:
        yield staging
        _commit(staging, output_dir, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _commit(staging: Path, output_dir: Path, overwrite: bool) -> None:
    """Rename `staging` to `output_dir`; an existing `output_dir` is moved aside and deleted only with `overwrite`."""
    replaced = output_dir.with_name(f"{staging.name}.replaced")
    if overwrite and output_dir.exists():
        output_dir.rename(replaced)
    try:
        staging.rename(output_dir)  # fails if another process created a (non-empty) output_dir meanwhile
    except OSError as error:
        raise ConfigurationError(
            f"{output_dir} was written by another process while this conversion ran ({error.strerror}); nothing was "
            "replaced. Convert into another folder, or pass overwrite=True (`scldm convert --overwrite`)."
        ) from error
    finally:
        shutil.rmtree(replaced, ignore_errors=True)


def _remove_abandoned_staging(output_dir: Path) -> None:
    """Delete staging folders of `output_dir` left by conversions whose process no longer runs (on this machine)."""
    for path in output_dir.parent.glob(f".{glob.escape(output_dir.name)}.*{STAGING_SUFFIX}"):
        match = re.fullmatch(rf"\.{re.escape(output_dir.name)}\.(\d+)-[0-9a-f]+{re.escape(STAGING_SUFFIX)}", path.name)
        if match and not _process_runs(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to another user
        pass
    return True


def write_arrow_shards(
    batches: Iterator[pa.RecordBatch], features: datasets.Features, directory: Path, max_shard_bytes: int
) -> None:
    """Stream ``batches`` into Arrow IPC stream files of about ``max_shard_bytes``, named ``data-XXXXX-of-YYYYY.arrow``."""
    shards: list[Path] = []
    writer, shard_bytes = None, 0
    try:
        for batch in batches:
            if writer is None or shard_bytes >= max_shard_bytes:
                if writer is not None:
                    writer.close()
                shards.append(directory / f"data-{len(shards):05d}.arrow")
                writer, shard_bytes = pa.ipc.new_stream(str(shards[-1]), features.arrow_schema), 0
            writer.write_batch(batch)
            shard_bytes += batch.nbytes
    finally:
        if writer is not None:
            writer.close()
    for index, shard in enumerate(shards):
        shard.rename(directory / f"data-{index:05d}-of-{len(shards):05d}.arrow")


def load_corpus(path: str | PathLike, streaming: bool = False,
                revision: str | None = None) -> tuple[datasets.Dataset | datasets.IterableDataset, CorpusInfo]:
    """Open a corpus folder written by :func:`anndata_to_corpus`, or a Hub dataset repo id holding one (pushed by
    :func:`~scldm_hf.data.hub.push_corpus_to_hub`) at `revision`, from the local cache when offline.

    ``streaming=False`` memory-maps the shards into a ``Dataset``; ``streaming=True`` returns an ``IterableDataset``
    reading the shard files record batch by record batch (each file is one of its ``num_shards``, so
    ``split_dataset_by_node`` and DataLoader workers split it by file). Both split across processes with
    ``datasets.distributed.split_dataset_by_node``.
    """
    path = resolve_corpus_dir(path, revision)
    info = CorpusInfo.load(path)
    shards = sorted(str(shard) for shard in Path(path).glob(SHARD_GLOB))
    if not shards:
        raise InputDataError(f"The corpus folder {path} holds no {SHARD_GLOB} shards; rebuild it with anndata_to_corpus.")
    return open_arrow_shards(shards, streaming), info


def open_arrow_shards(shards: Sequence[str | PathLike],
                      streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset:
    """The Arrow stream files `shards` (written by :func:`write_arrow_shards`), in order: one memory-mapped
    ``Dataset``, or with `streaming` an ``IterableDataset`` reading them record batch by record batch (one of its
    ``num_shards`` per file); pages it has read are not kept mapped, so its memory does not grow with the files."""
    if streaming:
        return datasets.load_dataset("arrow", data_files=[str(shard) for shard in shards], split="train", streaming=True)
    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(shard)) for shard in shards])
