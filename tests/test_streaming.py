"""Training from a streamed corpus (`streaming: true`): each process reads its own shards, shuffled through a seeded
buffer, and both stages train on an `IterableDataset` (the DiT on the streamed latent cache)."""

import csv
import json
import math
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from accelerate import Accelerator, debug_launcher
from accelerate.state import AcceleratorState

from scldm_hf.data import anndata_to_corpus, load_corpus
from scldm_hf.pipelines import SCLDMPipeline
from scldm_hf.training import DiTTrainingConfig, VAETrainingConfig, load_config
from scldm_hf.training.data import LATENT_CACHE_DIR, build_dataloader, first_rows, held_out, split_train_validation
from scldm_hf.training.dit import train_dit
from scldm_hf.training.vae import train_vae

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"
NUM_CELLS, CELLS_PER_SHARD = 200, 50

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, pbmc_counts):
    """The first 200 PBMC cells in 4 shards of 50 cells."""
    path = tmp_path_factory.mktemp("streaming") / "corpus"
    anndata_to_corpus(pbmc_counts[:NUM_CELLS].copy(), path, covariates=["cell_type"], chunk_size=CELLS_PER_SHARD,
                      max_shard_size=1)
    return path


def record_streamed_cells(corpus: str, output_dir: str) -> None:
    """One rank: the cell ids of its loader in epochs 0, 0 again and 1, written to ``cells_rank<i>.json``."""
    AcceleratorState._reset_state(reset_partial_state=True)  # the forked rank must not inherit the parent's state
    accelerator = Accelerator(cpu=True)
    config = load_config(VAETrainingConfig, TINY, {"output_dir": output_dir, "data": corpus, "streaming": True,
                                                   "shuffle_buffer_size": 20}, section="vae")
    dataset, _ = load_corpus(corpus, streaming=True)
    loader = build_dataloader(dataset, config, lambda rows: [row["cell_id"] for row in rows], accelerator)
    epochs = []
    for epoch in (0, 0, 1):
        loader.set_epoch(epoch)
        epochs.append([cell for batch in loader for cell in batch])
    Path(output_dir, f"cells_rank{accelerator.process_index}.json").write_text(json.dumps(epochs))


def test_two_processes_stream_disjoint_shards_that_cover_the_corpus(corpus, tmp_path):
    debug_launcher(record_streamed_cells, args=(str(corpus), str(tmp_path)), num_processes=2)
    ranks = [json.loads((tmp_path / f"cells_rank{rank}.json").read_text()) for rank in (0, 1)]
    every_cell = set(load_corpus(corpus)[0]["cell_id"])
    for epoch in range(3):
        assert len(ranks[0][epoch]) == len(ranks[1][epoch]) == NUM_CELLS // 2
        assert not set(ranks[0][epoch]) & set(ranks[1][epoch])
        assert set(ranks[0][epoch]) | set(ranks[1][epoch]) == every_cell
    for first_epoch, repeated, next_epoch in ranks:
        assert first_epoch == repeated  # the order is a function of (seed, epoch)
        assert next_epoch != first_epoch
    file_order = list(load_corpus(corpus)[0]["cell_id"])
    assert ranks[0][0] != [cell for cell in file_order if cell in set(ranks[0][0])]  # shuffled, not file order


@pytest.mark.parametrize("num_rows", [1, 70, NUM_CELLS + 1])
def test_first_rows_of_a_stream_are_its_first_python_rows(corpus, num_rows):
    """Read as Arrow record batches: the rows and features that reading Python rows gives."""
    stream = load_corpus(corpus, streaming=True)[0]
    for rows in (stream, stream.shuffle(seed=0, buffer_size=20), split_train_validation(stream, 0.2, seed=0)[0]):
        expected = datasets.Dataset.from_list(list(rows.take(num_rows)), features=rows.features)
        read = first_rows(rows, num_rows)
        assert read.features == expected.features and len(read) == min(num_rows, len(expected)) == len(expected)
        assert read.to_dict() == expected.to_dict()
    empty = first_rows(stream, 0)
    assert len(empty) == 0 and empty.features == stream.features


def finite_losses(output_dir: Path) -> list[float]:
    with open(output_dir / "logs" / "metrics.csv") as file:
        losses = [float(row["value"]) for row in csv.DictReader(file) if row["metric"] == "loss"]
    assert losses and all(math.isfinite(loss) for loss in losses)
    return losses


def test_both_stages_train_from_a_streamed_corpus(corpus, tmp_path):
    options = {"data": str(corpus), "streaming": True, "max_train_steps": 4, "lr_warmup_steps": 1,
               "validation_fraction": 0.2}
    vae_dir, pipeline_dir = tmp_path / "vae", tmp_path / "pipeline"
    train_vae(load_config(VAETrainingConfig, TINY, {**options, "output_dir": str(vae_dir)}, section="vae"))
    finite_losses(vae_dir)
    train_dit(load_config(DiTTrainingConfig, TINY, {**options, "output_dir": str(pipeline_dir),
                                                    "vae_name_or_path": str(vae_dir)}, section="dit"))
    finite_losses(pipeline_dir)
    assert list((pipeline_dir / LATENT_CACHE_DIR).glob("data-*-of-*.arrow"))

    num_validation = int(held_out(load_corpus(corpus)[0]["cell_id"], 0.2, seed=0).sum())
    assert 0 < num_validation < NUM_CELLS
    conditioner = SCLDMPipeline.from_pretrained(pipeline_dir).conditioner  # latent library-size model, streamed
    assert conditioner.uses_latents and int(conditioner.group_num_cells.sum()) == NUM_CELLS - num_validation
    for card in (vae_dir / "README.md", pipeline_dir / "README.md"):
        text = card.read_text()
        assert f"({NUM_CELLS - num_validation} for training, {num_validation} held out" in text, card


def test_resumed_streaming_run_matches_an_uninterrupted_one(corpus, tmp_path):
    """Resuming mid-epoch replays the epoch's seeded order and skips the batches already seen (here 8 of 18)."""
    def run(output_dir: Path, **options) -> dict:
        config = load_config(VAETrainingConfig, TINY, {"data": str(corpus), "output_dir": str(output_dir),
                                                       "streaming": True, "max_train_steps": 12,
                                                       "checkpointing_steps": 8, **options}, section="vae")
        return train_vae(config).state_dict()

    uninterrupted = run(tmp_path / "a")
    shutil.copytree(tmp_path / "a" / "checkpoints" / "checkpoint-8", tmp_path / "b" / "checkpoints" / "checkpoint-8")
    resumed = run(tmp_path / "b", resume_from_checkpoint="latest")
    for name, value in uninterrupted.items():
        assert torch.equal(value, resumed[name]), name
