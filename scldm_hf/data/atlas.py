"""Hub atlases stored as sparse token/value rows with a separate gene table (scGPT / Tahoe-100M layout) -> corpus.

The layout, as ``tahoebio/Tahoe-100M`` has it on the Hub: the dataset card's ``configs`` name an expression config
(``expression_data``: parquet rows with ``genes``, a list of int token ids, ``expressions``, the matching values, and
cell annotation columns such as ``drug``, ``cell_line_id`` or ``BARCODE_SUB_LIB_ID``) and a gene config
(``gene_metadata``: ``token_id`` -> ``gene_symbol`` / ``ensembl_id``). Token ids are mapped to gene names through
the gene table; tokens the table lacks are not genes (scGPT's ``<cls>`` leads each Tahoe row, with a negative value)
and are dropped. Rows are read ``chunk_size`` at a time from the parquet files and written as they come, so memory
does not grow with the atlas; values must be raw counts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
from datasets.data_files import DataFilesDict, sanitize_patterns
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard
from tqdm.auto import tqdm

from ..errors import ConfigurationError, InputDataError
from ..validation import check_chunk_size, check_count_chunk, check_count_range, check_no_empty_cells
from .corpus import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_SHARD_SIZE,
    CorpusInfo,
    cells_to_corpus,
    covariate_codes,
    release_freed_memory,
)
from .hub import hub_snapshot, looks_like_local_path
from .vocab import GeneVocab


@dataclass(frozen=True)
class TokenValueLayout:
    """Where a token/value atlas keeps what; the defaults are Tahoe-100M's names."""

    expression_config: str = "expression_data"
    gene_config: str = "gene_metadata"
    token_column: str = "genes"
    value_column: str = "expressions"
    gene_token_column: str = "token_id"
    gene_name_column: str = "gene_symbol"
    cell_id_column: str | None = None  # None: row numbers


@dataclass(frozen=True)
class ParquetRows:
    """The rows of parquet `files`, read in order one row group at a time (``pyarrow.dataset``'s scanner reads ahead
    of a slow consumer, so its memory grows with the atlas)."""

    files: list[str]

    @property
    def schema(self) -> pa.Schema:
        return pq.read_schema(self.files[0])

    @property
    def num_rows(self) -> int:
        return sum(pq.ParquetFile(path).metadata.num_rows for path in self.files)

    def batches(self, columns: list[str], batch_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[pa.RecordBatch]:
        for path in self.files:
            with pq.ParquetFile(path) as file:
                yield from file.iter_batches(batch_size=batch_size, columns=columns)


def config_patterns(card: DatasetCard, config_name: str, repo_id: str) -> dict[str, list[str]]:
    """``{split: data file patterns}`` of `config_name` in the dataset card's ``configs``."""
    configs = MetadataConfigs.from_dataset_card_data(card.data)
    if config_name not in configs or "data_files" not in configs[config_name]:
        raise ConfigurationError(
            f"The dataset card of {repo_id} has no config {config_name!r} with data_files (configs: "
            f"{', '.join(map(repr, configs)) or 'none'}); name the right one with --expression-config/--gene-config."
        )
    return sanitize_patterns(configs[config_name]["data_files"])


def local_files(snapshot: Path, patterns: dict[str, list[str]]) -> list[str]:
    """The files of every split matching `patterns` in `snapshot`, resolved as ``datasets.load_dataset`` does."""
    files = DataFilesDict.from_patterns(patterns, base_path=str(snapshot))
    return sorted(str(path) for split in files.values() for path in split)


def read_gene_table(files: Sequence[str], layout: TokenValueLayout, where: str) -> tuple[GeneVocab, np.ndarray]:
    """The vocabulary of the table's gene names (sorted) and ``vocab_id_of_token [max token id + 1]`` (0: no gene)."""
    table = pq.ParquetDataset(list(files)).read(columns=[layout.gene_token_column, layout.gene_name_column]).to_pandas()
    tokens, names = table[layout.gene_token_column].to_numpy(np.int64), table[layout.gene_name_column]
    duplicated = names[names.duplicated(keep=False)].dropna().unique()
    if names.isna().any() or duplicated.size or pd.Series(tokens).duplicated().any() or (tokens < 0).any():
        raise InputDataError(
            f"The gene table {where} must map each token id (>= 0) to one gene: {int(names.isna().sum())} missing "
            f"names, duplicated names {list(duplicated[:5])}, {int(pd.Series(tokens).duplicated().sum())} repeated "
            f"token ids; choose a unique name column with --gene-name-column (e.g. ensembl_id)."
        )
    vocab = GeneVocab(sorted(names.astype(str)))
    vocab_id_of_token = np.zeros(tokens.max() + 1, dtype=np.int32)
    vocab_id_of_token[tokens] = vocab.ids_of(names.astype(str))
    return vocab, vocab_id_of_token


def token_values_to_corpus(
    repo_id: str,
    output_dir: str | PathLike,
    covariates: Sequence[str] = (),
    layout: TokenValueLayout = TokenValueLayout(),
    revision: str | None = None,
    local_files_only: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> CorpusInfo:
    """Convert the Hub dataset `repo_id` (token/value layout) at `revision`, or a local copy of one, into a corpus folder.

    Only the dataset card and the files of the two configs are downloaded (or taken from the local cache). One pass
    reads the `covariates` columns for their labels (sorted), a second one the cells, ``chunk_size`` rows at a time.
    """
    check_chunk_size(chunk_size)

    def snapshot_of(patterns: list[str]) -> Path:
        if looks_like_local_path(repo_id):  # a local copy (`hf download --local-dir`)
            return Path(repo_id)
        return hub_snapshot(repo_id, "dataset", revision, local_files_only, ["README.md", *patterns],
                            fix="check the repo id and revision")

    card_path = snapshot_of([]) / "README.md"
    card = DatasetCard.load(card_path) if card_path.is_file() else DatasetCard("")
    configs = {name: config_patterns(card, name, repo_id) for name in (layout.expression_config, layout.gene_config)}
    snapshot = snapshot_of([pattern for config in configs.values() for split in config.values() for pattern in split])
    vocab, vocab_id_of_token = read_gene_table(local_files(snapshot, configs[layout.gene_config]), layout,
                                               f"{repo_id} ({layout.gene_config})")
    cells = ParquetRows(local_files(snapshot, configs[layout.expression_config]))
    _check_columns(cells.schema, [layout.token_column, layout.value_column, *covariates,
                                  *([layout.cell_id_column] if layout.cell_id_column else [])], repo_id, layout)
    labels = {name: sorted(set(_unique_labels(cells, name))) for name in covariates}
    batches = _cell_batches(cells, layout, vocab_id_of_token, len(vocab), labels, chunk_size,
                            where=f"column {layout.value_column!r} of {repo_id} ({layout.expression_config})")
    source = Path(repo_id).name if looks_like_local_path(repo_id) else f"hf://datasets/{repo_id}@{snapshot.name}"
    return cells_to_corpus(batches, output_dir, vocab.genes, labels, source, max_shard_size=max_shard_size,
                           overwrite=overwrite)


def _check_columns(schema: pa.Schema, columns: Sequence[str], repo_id: str, layout: TokenValueLayout) -> None:
    missing = [name for name in columns if name not in schema.names]
    if missing:
        raise ConfigurationError(
            f"The {layout.expression_config!r} config of {repo_id} has no column(s) {', '.join(map(repr, missing))}; "
            f"its columns: {', '.join(schema.names)}. Name the right ones (--covariate, --token-column, "
            "--value-column, --cell-id-column)."
        )


def _unique_labels(cells: ParquetRows, name: str) -> Iterator[str]:
    """The distinct labels of column `name`, read batch by batch (only that column)."""
    for batch in cells.batches(columns=[name]):
        yield from (str(label) for label in pc.unique(batch.column(name)).to_pylist())


def _cell_batches(cells: ParquetRows, layout: TokenValueLayout, vocab_id_of_token: np.ndarray, num_genes: int,
                  labels: dict[str, list[str]], chunk_size: int, where: str,
                  ) -> Iterator[tuple[list[str], sp.csr_matrix, dict[str, np.ndarray]]]:
    """``(cell ids, counts CSR [b, genes], {covariate: label ids [b]})`` of each batch of `chunk_size` rows."""
    columns = [layout.token_column, layout.value_column, *labels,
               *([layout.cell_id_column] if layout.cell_id_column else [])]
    fix = (f"the atlas must store raw integer counts (UMIs) in {layout.value_column!r}: point --value-column at a "
           "column of raw counts; normalised or log values cannot be turned back into counts")
    first_row, empty_cells = 0, []
    with tqdm(total=cells.num_rows, unit="cells", desc="Converting atlas") as progress:
        for batch in cells.batches(columns, batch_size=chunk_size):
            rows = np.arange(first_row, first_row + batch.num_rows)
            cell_ids = ([str(cell) for cell in batch.column(layout.cell_id_column).to_pylist()]
                        if layout.cell_id_column else [str(row) for row in rows])
            counts = _counts(batch.column(layout.token_column), batch.column(layout.value_column),
                             vocab_id_of_token, num_genes, rows)
            row_names = [f"{cell} (row {row})" for cell, row in zip(cell_ids, rows)]
            check_count_chunk(counts, row_names, where, fix)
            check_count_range(counts, row_names, where, fix)
            counts.sum_duplicates()
            empty_cells.extend(np.asarray(cell_ids)[np.diff(counts.indptr) == 0])
            codes = covariate_codes(batch.select(list(labels)).to_pandas(), labels)[1] if labels else {}
            yield cell_ids, counts.astype(np.int32), codes
            first_row += batch.num_rows
            progress.update(batch.num_rows)
            release_freed_memory()
    check_no_empty_cells(empty_cells, over=" over the genes of the gene table")


def _counts(tokens: pa.ListArray, values: pa.ListArray, vocab_id_of_token: np.ndarray, num_genes: int,
            rows: np.ndarray) -> sp.csr_matrix:
    """CSR ``[rows, genes]`` of the batch of atlas `rows` (column = vocab id - 1), tokens outside the gene table
    dropped."""
    row_lengths = pc.list_value_length(tokens).fill_null(0).to_numpy()
    mismatched = np.flatnonzero(row_lengths != pc.list_value_length(values).fill_null(0).to_numpy())
    if mismatched.size:
        raise InputDataError(
            f"{mismatched.size} rows have token and value lists of different lengths (first: row "
            f"{rows[mismatched[0]]}): the atlas is corrupted, or --token-column/--value-column name columns that do "
            "not pair."
        )
    token_ids = tokens.flatten().to_numpy().astype(np.int64)
    row_of_value = np.repeat(np.arange(len(row_lengths)), row_lengths)
    known = (token_ids >= 0) & (token_ids < vocab_id_of_token.size)
    gene_ids = np.zeros_like(token_ids)
    gene_ids[known] = vocab_id_of_token[token_ids[known]]
    keep = gene_ids > 0
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row_of_value[keep], minlength=len(row_lengths)))])
    data = values.flatten().to_numpy(zero_copy_only=False)[keep]
    return sp.csr_matrix((data, gene_ids[keep] - 1, indptr), shape=(len(row_lengths), num_genes))
