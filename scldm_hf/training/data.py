"""Training data: the corpus a run reads, its train/validation split, the latent cache of stage 2 and data loaders."""

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
import torch
from accelerate import Accelerator
from accelerate.data_loader import SeedableRandomSampler, prepare_data_loader
from datasets.distributed import split_dataset_by_node
from datasets.fingerprint import Hasher
from datasets.table import InMemoryTable
from datasets.utils.py_utils import convert_file_size_to_int
from torch.utils.data import DataLoader

from scldm_hf.data import CorpusInfo, GeneVocab, anndata_to_corpus, load_corpus, load_pbmc68k_counts
from scldm_hf.data.corpus import (
    CORPUS_FILE_NAME,
    DEFAULT_MAX_SHARD_SIZE,
    SHARD_GLOB,
    open_arrow_shards,
    write_arrow_shards,
)
from scldm_hf.data.encoding import encode_batches
from scldm_hf.data.hub import hub_id, resolve_corpus_dir
from scldm_hf.errors import ConditionError, ConfigurationError, InputDataError, VocabularyError

from .config import TrainingConfig

# `data:` values that name a bundled data set instead of a path, and the provenance recorded for them.
BUILTIN_DATASETS = {"pbmc68k": load_pbmc68k_counts}
BUILTIN_SOURCES = {"pbmc68k": "scanpy.datasets.pbmc68k_reduced() (68k PBMC subsample, raw counts recovered)"}
LATENT_CACHE_DIR = "latent_cache"
LATENT_CACHE_KEY_FILE = "cache_key.json"
CORPUS_KEY_FILE = "source_key.json"
# rows per batch of the sequential passes over a data set (hashing cell ids, counting rows)
SCAN_BATCH_SIZE = 4096
TrainingData = datasets.Dataset | datasets.IterableDataset


def prepare_corpus(
    config: TrainingConfig,
    accelerator: Accelerator,
    vocab: GeneVocab | None = None,
    covariates: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    adata: ad.AnnData | None = None,
) -> tuple[TrainingData, CorpusInfo]:
    """Open ``config.data`` (or the in-memory `adata`) as a corpus, memory-mapped or (``config.streaming``) as an
    ``IterableDataset``; with a `vocab`, its genes must be exactly that vocabulary.

    A corpus folder, or the Hub dataset id of one (at ``config.data_revision``), is used as is. An ``.h5ad`` file or a built-in name (``pbmc68k``) is converted once, by the main
    process, into ``<output_dir>/corpus`` with `covariates` (default ``config.covariates``; a mapping fixes the label
    order) and reused by later runs in the same output folder (e.g. after a crash) while the file (path, size,
    modification time), covariates, layer and vocabulary are unchanged; otherwise it is converted again. An `adata`
    (counts in ``X`` or ``layers[config.layer]``) replaces ``config.data``, which then only names it (card,
    ``training_config.yaml``); having no file to compare, it is converted on every run.
    """
    source = Path(config.data)
    if adata is None and (source / CORPUS_FILE_NAME).is_file():
        corpus_dir = source
    elif hub_id(config.data):
        corpus_dir = resolve_corpus_dir(config.data, config.data_revision)
    else:
        if adata is None and config.data not in BUILTIN_DATASETS and not (source.is_file() and source.suffix == ".h5ad"):
            raise ConfigurationError(
                f"data={config.data!r} is neither a corpus folder (with {CORPUS_FILE_NAME}), the Hub dataset id of "
                f"one, an .h5ad file nor one of {sorted(BUILTIN_DATASETS)}; convert your AnnData with "
                "`scldm convert in.h5ad corpus_dir`."
            )
        corpus_dir = Path(config.output_dir) / "corpus"
        chosen = config.covariates if covariates is None else covariates
        key = None if adata is not None else _corpus_key(config, chosen, vocab)
        with accelerator.main_process_first():
            if accelerator.is_main_process and (key is None or not _cache_matches(corpus_dir, key, CORPUS_KEY_FILE)):
                if adata is not None:
                    adata_or_path = adata
                else:
                    adata_or_path = BUILTIN_DATASETS[config.data]() if config.data in BUILTIN_DATASETS else source
                info = anndata_to_corpus(adata_or_path, corpus_dir, vocab=vocab, covariates=chosen, layer=config.layer,
                                         overwrite=True)
                if adata is None and config.data in BUILTIN_SOURCES:
                    info.source = BUILTIN_SOURCES[config.data]
                    info.save(corpus_dir)
                if key is not None:  # a replaced corpus folder holds no key, so no later run reuses it by mistake
                    (corpus_dir / CORPUS_KEY_FILE).write_text(json.dumps(key))
    dataset, info = load_corpus(corpus_dir, streaming=config.streaming)
    if vocab is not None and info.genes != vocab.genes:
        raise VocabularyError(
            f"the corpus {corpus_dir} has a different gene vocabulary ({len(info.genes)} genes) than the model "
            f"({len(vocab)} genes); pass the .h5ad as data (it is converted onto the model's genes) or re-convert "
            "with anndata_to_corpus(..., vocab=GeneVocab(model.config.gene_names))."
        )
    return dataset, info


def split_train_validation(dataset: TrainingData, fraction: float, seed: int) -> tuple[TrainingData, TrainingData | None]:
    """Seeded random split into (train, validation); validation is None when `fraction` is 0.

    A ``Dataset``'s split depends only on its number of rows and the seed; an ``IterableDataset``'s, read once, on
    each row's ``cell_id`` and the seed (`held_out`). Either way a corpus and its latent cache split alike.
    """
    if fraction == 0:
        return dataset, None
    if isinstance(dataset, datasets.IterableDataset):
        # filtered as Arrow tables, so later formats are converted from Arrow with the features' dtypes
        tables = dataset.with_format("arrow")
        return tuple(
            tables.filter(lambda cells, keep=keep: held_out(cells["cell_id"].to_pylist(), fraction, seed) == keep,
                          batched=True).with_format(None)
            for keep in (False, True)
        )
    num_validation = max(1, round(fraction * len(dataset)))
    if num_validation >= len(dataset):
        raise InputDataError(
            f"validation_fraction={fraction} leaves no training cells out of {len(dataset)}; lower it or add cells."
        )
    order = np.random.default_rng(seed).permutation(len(dataset))
    return (select_rows(dataset, np.sort(order[num_validation:])),
            select_rows(dataset, np.sort(order[:num_validation])))


def select_rows(dataset: datasets.Dataset, rows: np.ndarray) -> datasets.Dataset:
    """The `rows` (``[n]`` int64 row numbers) of `dataset` through an in-memory indices mapping of 8 bytes per row
    made from `rows` as is (``Dataset.select`` makes a Python list of them first: about 80 bytes per row, twice that
    at its peak)."""
    rows = np.ascontiguousarray(rows, dtype=np.int64).view(np.uint64)
    indices = pa.chunked_array([rows])
    if dataset._indices is not None:  # already a selection: the rows of its own mapping
        indices = dataset._indices.column(0).take(indices)
    # given, not generated: `datasets` would pickle the whole state (the indices too) to hash it
    fingerprint = Hasher.hash([dataset._fingerprint, hashlib.blake2b(rows).hexdigest()])
    selected = datasets.Dataset(dataset.data, info=dataset.info.copy(), split=dataset.split,
                                indices_table=InMemoryTable(pa.table({"indices": indices})), fingerprint=fingerprint)
    return selected.with_format(dataset.format["type"], columns=dataset.format["columns"],
                                output_all_columns=dataset.format["output_all_columns"],
                                **dataset.format["format_kwargs"])


def held_out(cell_ids: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """``[N]`` bool: whether each cell is a validation cell of a streamed split, i.e. its seeded hash, uniform in
    [0, 1), is below `fraction` (independent of row order and sharding, so every process agrees)."""
    key = seed.to_bytes(8, "little", signed=True)
    hashes = [int.from_bytes(hashlib.blake2b(cell.encode(), digest_size=8, key=key).digest(), "little")
              for cell in cell_ids]
    return np.asarray(hashes, dtype=np.uint64) < np.uint64(fraction * 2**64)


def count_rows(dataset: TrainingData | None) -> int:
    """Rows of `dataset` (0 for None); an ``IterableDataset`` is read through once to count them."""
    if dataset is None:
        return 0
    if isinstance(dataset, datasets.Dataset):
        return len(dataset)
    return sum(len(table) for table in dataset.with_format("arrow").iter(batch_size=SCAN_BATCH_SIZE))


def first_rows(dataset: TrainingData, num_rows: int) -> datasets.Dataset:
    """The first `num_rows` rows of `dataset` (all if fewer), those of an ``IterableDataset`` read into memory as
    Arrow record batches (not as Python rows)."""
    if isinstance(dataset, datasets.Dataset):
        return dataset.select(range(min(num_rows, len(dataset))))
    tables, num_missing = [], num_rows
    batches = dataset.with_format("arrow").iter(batch_size=max(1, min(num_rows, SCAN_BATCH_SIZE)))
    while num_missing > 0 and (table := next(batches, None)) is not None:  # no batch read beyond the last row
        tables.append(table.slice(0, num_missing))
        num_missing -= len(tables[-1])
    rows = pa.concat_tables(tables) if tables else dataset.features.arrow_schema.empty_table()
    return datasets.Dataset(InMemoryTable(rows), info=datasets.DatasetInfo(features=dataset.features))


def spread_rows(dataset: TrainingData, num_rows: int) -> datasets.Dataset:
    """`num_rows` rows evenly spaced over a ``Dataset`` (a corpus sorted by label gives every label its share), or
    the first `num_rows` of an ``IterableDataset``."""
    if isinstance(dataset, datasets.Dataset) and len(dataset) > num_rows:
        return select_rows(dataset, np.linspace(0, len(dataset) - 1, num_rows).round().astype(np.int64))
    return first_rows(dataset, num_rows)


def batches_in_storage_order(rows: TrainingData, batch_size: int) -> Iterator[dict]:
    """Batches (in `rows`' format) of every row of `rows`, read in storage order: a pass over all training cells.

    Through a ``Dataset`` selection's indices mapping (a split's rows) a sequential pass is ~40x slower than
    reading the table itself (200,000 rows of ``[8, 16]`` latents: 37 s vs 0.9 s), so a selection is read as its
    whole table, batch by batch, keeping the selected rows (an unsorted selection's rows thus come in storage
    order). An unselected ``Dataset`` or an ``IterableDataset`` is iterated as is.
    """
    if isinstance(rows, datasets.IterableDataset) or rows._indices is None:
        yield from rows.iter(batch_size=batch_size)
        return
    table = datasets.Dataset(rows.data, info=rows.info).with_format(**rows.format)
    selected = np.zeros(len(table), dtype=bool)
    selected[rows._indices.column(0).to_numpy()] = True
    for start in range(0, len(table), batch_size):
        keep = selected[start:start + batch_size]
        if keep.any():
            batch = table[start:start + batch_size]
            yield {name: np.asarray(values)[keep] for name, values in batch.items()}


def build_dataloader(dataset: TrainingData, config: TrainingConfig, collate_fn, accelerator: Accelerator) -> DataLoader:
    """The training loader of this process, prepared by `accelerator` (device placement, ``set_epoch``).

    A ``Dataset`` is loaded map-style: ``Accelerator.prepare`` shards it across processes and seeds its order by
    (seed, epoch). An ``IterableDataset`` is split by `split_dataset_by_node` (whole shards per process when their
    number divides by the processes, else every process keeps its share of the rows) and shuffled through a buffer
    of ``config.shuffle_buffer_size`` cells seeded by (seed, epoch).
    """
    if isinstance(dataset, datasets.IterableDataset):
        shuffled = dataset.shuffle(seed=config.seed, buffer_size=config.shuffle_buffer_size)
        shard = split_dataset_by_node(shuffled, rank=accelerator.process_index, world_size=accelerator.num_processes)
        loader = DataLoader(shard, batch_size=config.batch_size, collate_fn=collate_fn, drop_last=True,
                            num_workers=config.dataloader_num_workers)
        # already split by node: prepared as for one process, so Accelerate does not shard it again
        return prepare_data_loader(loader, device=accelerator.device, num_processes=1, process_index=0,
                                   put_on_device=True, dispatch_batches=False)
    if len(dataset) < config.batch_size:
        raise InputDataError(
            f"{len(dataset)} training cells are fewer than batch_size={config.batch_size}; lower batch_size."
        )
    # A dedicated generator keeps the global RNG (model noise) untouched by loader iterators, so resuming mid-epoch
    # replays the same random numbers as an uninterrupted run.
    loader = accelerator.prepare(DataLoader(
        dataset, batch_size=config.batch_size, shuffle=True, collate_fn=collate_fn, drop_last=True,
        num_workers=config.dataloader_num_workers, generator=torch.Generator().manual_seed(config.seed)))
    seeded = loader.get_sampler()
    loader.set_sampler(ChunkedSeedableRandomSampler(seeded.data_source, generator=seeded.generator,
                                                    data_seed=seeded.initial_seed))
    return loader


class ChunkedSeedableRandomSampler(SeedableRandomSampler):
    """Accelerate's `SeedableRandomSampler` (the same order: a permutation of every row seeded by initial seed +
    epoch) that turns its permutation into Python ints `SCAN_BATCH_SIZE` at a time, not into one list of every row
    (about 40 bytes per training cell)."""

    def __iter__(self) -> Iterator[int]:
        self.generator.manual_seed(self.initial_seed + self.epoch)
        for chunk in torch.randperm(len(self.data_source), generator=self.generator).split(SCAN_BATCH_SIZE):
            yield from chunk.tolist()
        self.set_epoch(self.epoch + 1)


def align_covariate_labels(dataset: datasets.Dataset, labels: Mapping[str, Sequence[str]]) -> datasets.Dataset:
    """Re-code the ClassLabel columns of `dataset` to the label order `labels[name]` (a model's label ids).

    Raises `ConditionError` when the data holds a label the given list lacks.
    """
    for name, names in labels.items():
        feature = dataset.features[name]
        if list(feature.names) == list(names):
            continue
        position = {label: index for index, label in enumerate(names)}
        unknown = sorted(set(feature.names) - set(position))
        if unknown:
            raise ConditionError(f"covariate {name!r} of the data has labels {unknown} that the model lacks: {list(names)}.")
        new_ids = np.array([position[label] for label in feature.names], dtype=np.int64)
        # an in-memory column beside the memory-mapped table: nothing is rewritten or cached next to the corpus
        recoded = new_ids[np.asarray(dataset[name])]
        dataset = dataset.remove_columns(name).add_column(name, recoded, feature=datasets.ClassLabel(names=list(names)))
    return dataset


def corpus_to_anndata(dataset: datasets.Dataset, info: CorpusInfo, covariates: Sequence[str] = ()) -> ad.AnnData:
    """Cells of a corpus (split) as an AnnData of counts `[N, measured genes]` with label names in ``obs``."""
    measured = np.asarray(info.measured_gene_ids)
    column_of_id = np.full(len(info.genes) + 1, -1)
    column_of_id[measured] = np.arange(len(measured))
    gene_ids, counts = dataset["gene_ids"], dataset["counts"]
    indptr = np.cumsum([0] + [len(ids) for ids in gene_ids])
    matrix = sp.csr_matrix(
        (np.concatenate(counts).astype(np.float32), column_of_id[np.concatenate(gene_ids)], indptr),
        shape=(len(dataset), len(measured)),
    )
    obs = pd.DataFrame(
        {name: pd.Categorical(np.asarray(dataset.features[name].names)[dataset[name]]) for name in covariates},
        index=pd.Index(dataset["cell_id"]),
    )
    return ad.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=np.asarray(info.genes)[measured - 1]))


class LatentCollator:
    """Latent-cache rows -> ``{"latents": [B, T, D], "covariates": {name: LongTensor [B]}}``.

    `normalize` (e.g. `SCVAEModel.normalize_latents`) maps the cached VAE latents to the space the DiT models.
    """

    def __init__(self, covariates: Sequence[str], normalize: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.covariates = list(covariates)
        self.normalize = normalize

    def __call__(self, rows: Sequence[Mapping]) -> dict:
        latents = torch.stack([torch.as_tensor(row["latents"]) for row in rows])
        return {
            "latents": latents if self.normalize is None else self.normalize(latents),
            "covariates": {name: torch.tensor([int(row[name]) for row in rows]) for name in self.covariates},
        }


def encode_latent_cache(
    vae, dataset: TrainingData, info: CorpusInfo, output_dir: str | Path, batch_size: int, accelerator: Accelerator,
    streaming: bool = False,
) -> TrainingData:
    """Encode every cell once with the frozen `vae` into ``<output_dir>/latent_cache`` and open it memory-mapped
    (with `streaming`, as an ``IterableDataset``).

    Rows keep ``cell_id``, ``library_size`` and the covariate columns and add ``latents [T, D]`` (float32). The main
    process reads `dataset` (a ``Dataset`` or an ``IterableDataset``) in order and writes each encoded batch straight
    into Arrow shards (``data-XXXXX-of-YYYYY.arrow``, as a corpus), so neither encoding nor training holds the latents
    of all cells in memory; the folder is written atomically and reused while the VAE weights and the cells are
    unchanged.
    """
    cache_dir = Path(output_dir) / LATENT_CACHE_DIR
    key = {
        "vae_weights": _state_dict_digest(vae),
        "cells": _cells_digest(dataset, info.covariates),
        "covariates": {name: dataset.features[name].names for name in info.covariates},
    }
    with accelerator.main_process_first():
        if accelerator.is_main_process and not _cache_matches(cache_dir, key, LATENT_CACHE_KEY_FILE):
            vae.eval()
            staging = cache_dir.with_name(f".{LATENT_CACHE_DIR}.tmp")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            features, batches = _latent_record_batches(vae, dataset, info, batch_size)
            write_arrow_shards(batches, features, staging, convert_file_size_to_int(DEFAULT_MAX_SHARD_SIZE))
            (staging / LATENT_CACHE_KEY_FILE).write_text(json.dumps(key))
            shutil.rmtree(cache_dir, ignore_errors=True)
            staging.rename(cache_dir)
    return open_arrow_shards(sorted(cache_dir.glob(SHARD_GLOB)), streaming)


def _cells_digest(dataset: TrainingData, covariates) -> str:
    """SHA-256 of what the cache is made of: each cell's id, gene tokens, counts, library size and labels, read as
    Arrow batch by batch (a corpus re-converted with other counts under the same cell ids gets a new key)."""
    columns = ["cell_id", "gene_ids", "counts", "library_size", *covariates]
    digest = hashlib.sha256()
    for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=SCAN_BATCH_SIZE):
        digest.update("\n".join(table["cell_id"].to_pylist()).encode() + b"\n")
        for name in columns[1:]:
            column = table[name].combine_chunks()
            if pa.types.is_list(column.type):
                digest.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).tobytes())
                column = pc.list_flatten(column)
            digest.update(column.to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()


def _latent_record_batches(vae, dataset: TrainingData, info: CorpusInfo, batch_size: int,
                           ) -> tuple[datasets.Features, Iterator[pa.RecordBatch]]:
    """Features of a latent-cache row and its Arrow record batches, one per encoded batch of `batch_size` cells."""
    kept_columns = ["cell_id", "library_size", *info.covariates]
    latent_shape = (vae.config.num_latent_tokens, vae.config.latent_dim)
    features = datasets.Features({**{name: dataset.features[name] for name in kept_columns},
                                  "latents": datasets.Array2D(shape=latent_shape, dtype="float32")})

    def batches() -> Iterator[pa.RecordBatch]:
        rows = dataset.select_columns(kept_columns).iter(batch_size=batch_size)
        for columns, latents in zip(rows, encode_batches(vae, dataset, batch_size=batch_size), strict=True):
            encoded = datasets.Dataset.from_dict({**columns, "latents": latents.astype(np.float32)}, features=features)
            yield from encoded.data.table.to_batches()

    return features, batches()


def _cache_matches(cache_dir: Path, key: dict, key_file_name: str) -> bool:
    key_file = cache_dir / key_file_name
    return key_file.is_file() and json.loads(key_file.read_text()) == key


def _corpus_key(config: TrainingConfig, covariates, vocab: GeneVocab | None) -> dict:
    """What the converted ``<output_dir>/corpus`` was made from (JSON values)."""
    source = Path(config.data)
    origin = {"builtin": config.data} if config.data in BUILTIN_DATASETS else {
        "path": str(source.resolve()), "size": source.stat().st_size, "mtime_ns": source.stat().st_mtime_ns}
    return json.loads(json.dumps({
        **origin, "covariates": covariates, "layer": config.layer,
        "vocab_sha256": None if vocab is None else hashlib.sha256("\n".join(vocab.genes).encode()).hexdigest(),
    }))


def _state_dict_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
