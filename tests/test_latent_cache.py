"""Stage 2's latent cache is written into Arrow shards batch by batch while encoding and read back memory-mapped,
with the latents `encode_dataset` computes in memory."""

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from scldm_hf.data import encode_dataset
from scldm_hf.models import SCVAEConfig, SCVAEModel
from scldm_hf.training import data as training_data
from scldm_hf.training.data import (
    LATENT_CACHE_DIR,
    batches_in_storage_order,
    encode_latent_cache,
    split_train_validation,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_CELLS, BATCH_SIZE = 150, 32


@pytest.fixture(scope="module")
def cells(pbmc_dataset):
    dataset, info = pbmc_dataset
    return dataset.select(range(NUM_CELLS)), info


@pytest.fixture(scope="module")
def vae(cells):
    torch.manual_seed(0)
    model = SCVAEModel(SCVAEConfig(gene_names=cells[1].genes, hidden_size=16, num_latent_tokens=3, latent_dim=4,
                                   encoder_layers=1, decoder_layers=1, encoder_cross_attention_heads=2,
                                   decoder_cross_attention_heads=2, num_attention_heads=2))
    return model.eval()


def test_latent_cache_is_sharded_memory_mapped_and_holds_the_in_memory_latents(cells, vae, tmp_path, monkeypatch):
    dataset, info = cells
    monkeypatch.setattr(training_data, "DEFAULT_MAX_SHARD_SIZE", "4KB")  # several shards from 150 cells
    cache = encode_latent_cache(vae, dataset, info, tmp_path, BATCH_SIZE, Accelerator(cpu=True))
    shards = sorted(str(path) for path in (tmp_path / LATENT_CACHE_DIR).glob("data-*-of-*.arrow"))
    assert len(shards) > 1 and [file["filename"] for file in cache.cache_files] == shards
    expected = encode_dataset(vae, dataset, batch_size=BATCH_SIZE, show_progress=False)
    np.testing.assert_array_equal(cache.with_format("numpy")["latents"], expected)
    for column in ("cell_id", "library_size", "cell_type"):
        assert cache[column] == dataset[column]
    assert cache.features["cell_type"] == dataset.features["cell_type"]

    mtimes = [(tmp_path / LATENT_CACHE_DIR / path).stat().st_mtime_ns for path in shards]
    reopened = encode_latent_cache(vae, dataset, info, tmp_path, BATCH_SIZE, Accelerator(cpu=True))
    assert [(tmp_path / LATENT_CACHE_DIR / path).stat().st_mtime_ns for path in shards] == mtimes
    np.testing.assert_array_equal(reopened.with_format("numpy")["latents"], expected)


def test_latent_cache_is_re_encoded_when_counts_change_under_the_same_cell_ids(cells, vae, tmp_path):
    dataset, info = cells
    encode_latent_cache(vae, dataset, info, tmp_path, BATCH_SIZE, Accelerator(cpu=True))
    doubled = dataset.map(lambda row: {"counts": [2 * count for count in row["counts"]]} if row["cell_id"] ==
                          dataset[0]["cell_id"] else {}, features=dataset.features)
    assert doubled["cell_id"] == dataset["cell_id"]
    cache = encode_latent_cache(vae, doubled, info, tmp_path, BATCH_SIZE, Accelerator(cpu=True))
    expected = encode_dataset(vae, doubled, batch_size=BATCH_SIZE, show_progress=False)
    np.testing.assert_array_equal(cache.with_format("numpy")["latents"], expected)
    assert not np.array_equal(expected[0], encode_dataset(vae, dataset.select([0]), show_progress=False)[0])


def test_corpus_and_latent_cache_split_into_the_rows_of_the_seeded_permutation(cells, vae, tmp_path):
    dataset, info = cells
    cache = encode_latent_cache(vae, dataset, info, tmp_path, BATCH_SIZE, Accelerator(cpu=True))
    order = np.random.default_rng(7).permutation(NUM_CELLS)
    expected = [[dataset[int(row)]["cell_id"] for row in np.sort(rows)] for rows in (order[30:], order[:30])]
    for rows in (dataset, cache):
        assert [split["cell_id"] for split in split_train_validation(rows, 0.2, seed=7)] == expected
    reversed_rows = dataset.select(range(NUM_CELLS - 1, -1, -1))  # a selection splits into its own rows
    assert split_train_validation(reversed_rows, 0.2, seed=7)[1]["cell_id"] == [
        reversed_rows[int(row)]["cell_id"] for row in np.sort(order[:30])]

    latents = cache.with_format("numpy", columns=["latents"])
    for split, rows in zip(split_train_validation(latents, 0.2, seed=7), (order[30:], order[:30]), strict=True):
        assert split.format == latents.format
        np.testing.assert_array_equal(split[:]["latents"], latents[np.sort(rows)]["latents"])


def test_storage_order_batches_hold_exactly_the_selected_rows(cells, vae, tmp_path):
    """The stage-2 library-size fit reads every training latent through `batches_in_storage_order`: the split's
    rows, each once, in their format, whatever the batch size (also for an unsorted selection, and a stream)."""
    dataset, info = cells
    cache = encode_latent_cache(vae, dataset, info, tmp_path, BATCH_SIZE, Accelerator(cpu=True))
    train = split_train_validation(cache, 0.2, seed=7)[0].select_columns(["latents", "cell_id"]).with_format("numpy")
    for batch_size in (7, 200):
        batches = list(batches_in_storage_order(train, batch_size))
        assert all(batch["latents"].dtype == np.float32 and batch["latents"].shape[1:] == (3, 4) for batch in batches)
        np.testing.assert_array_equal(np.concatenate([batch["latents"] for batch in batches]), train[:]["latents"])
        assert np.concatenate([batch["cell_id"] for batch in batches]).tolist() == train["cell_id"]
    shuffled = cache.select([5, 1, 9]).with_format("numpy", columns=["cell_id"])
    assert [cell for batch in batches_in_storage_order(shuffled, 2) for cell in batch["cell_id"]] == [
        cache[row]["cell_id"] for row in (1, 5, 9)]
    streamed = cache.to_iterable_dataset().with_format("numpy")
    assert sum(len(batch["cell_id"]) for batch in batches_in_storage_order(streamed, 64)) == NUM_CELLS
