"""Resuming training safely: checkpoints hold no code, a missing RNG state is an error, and a run whose data, labels,
model or optimisation settings differ from its checkpoint's is refused unless the change is asked for (and recorded).
"""

import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from accelerate.data_loader import SeedableRandomSampler
from safetensors.torch import load_file

from scldm_hf.data import anndata_to_corpus
from scldm_hf.errors import CheckpointError
from scldm_hf.training import VAETrainingConfig, load_config
from scldm_hf.training.checkpointing import TRAINING_STATE_FILE, list_checkpoints
from scldm_hf.training.data import build_dataloader, prepare_corpus
from scldm_hf.training.loop import build_accelerator
from scldm_hf.training.vae import train_vae

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "tiny.yaml"
NUM_CELLS = 60
EIGHT_STEPS = {"max_train_steps": 8, "checkpointing_steps": 4, "logging_steps": 2, "validation_fraction": 0.0,
              "lr_warmup_steps": 1}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def vae_config(**overrides) -> VAETrainingConfig:
    return load_config(VAETrainingConfig, TINY, {**EIGHT_STEPS, **overrides}, section="vae")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, pbmc_counts) -> Path:
    path = tmp_path_factory.mktemp("resume") / "corpus"
    anndata_to_corpus(pbmc_counts[:NUM_CELLS].copy(), path, covariates=["cell_type"])
    return path


@pytest.fixture(scope="module")
def checkpointed(corpus, tmp_path_factory) -> Path:
    """Output folder of an 8-step VAE run with `checkpoints/checkpoint-4` and `checkpoint-8`."""
    output_dir = tmp_path_factory.mktemp("resume") / "vae"
    train_vae(vae_config(data=str(corpus), output_dir=str(output_dir)))
    return output_dir


@pytest.fixture
def copy_of(checkpointed, tmp_path) -> Path:
    """An output folder holding only `checkpoint-4` of that run: resuming trains steps 5 to 8."""
    target = tmp_path / "vae"
    shutil.copytree(checkpointed / "checkpoints" / "checkpoint-4", target / "checkpoints" / "checkpoint-4")
    return target


def test_loader_order_is_accelerates_seeded_permutation_epoch_by_epoch(tmp_path):
    """The loader's chunked sampler draws the rows in the order Accelerate's `SeedableRandomSampler` gives."""
    config = vae_config(data="unused", output_dir=str(tmp_path), batch_size=16, seed=3)
    loader = build_dataloader(datasets.Dataset.from_dict({"row": list(range(10_000))}), config,
                              lambda rows: [row["row"] for row in rows], build_accelerator(config))
    reference = SeedableRandomSampler(range(10_000), generator=torch.Generator(), data_seed=config.seed)
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        reference.set_epoch(epoch)
        order = [row for batch in loader for row in batch]
        assert len(order) == 10_000 and order == list(reference)
    assert order != sorted(order)


class WritesMarker:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def test_checkpoints_hold_no_custom_pickles(checkpointed):
    checkpoint = checkpointed / "checkpoints" / "checkpoint-4"
    names = {path.name for path in checkpoint.iterdir()}
    assert {"training_state.json", "rng_state_0.safetensors", "model.safetensors"} <= names
    assert not any(name.startswith("custom_checkpoint") for name in names), names
    state = json.loads((checkpoint / TRAINING_STATE_FILE).read_text())
    assert state["progress"]["global_step"] == 4 and state["settings"]["data"]["num_cells"] == NUM_CELLS


def test_planted_checkpoint_pickle_never_runs(copy_of, corpus, tmp_path):
    marker = tmp_path / "marker"
    checkpoint = copy_of / "checkpoints" / "checkpoint-4"
    torch.save(WritesMarker(marker), checkpoint / "custom_checkpoint_0.pkl")
    with pytest.raises(CheckpointError, match=r"holds \['custom_checkpoint_0\.pkl'\]: pickles .* They were not read"):
        train_vae(vae_config(data=str(corpus), output_dir=str(copy_of), resume_from_checkpoint="latest"))
    assert not marker.exists(), "code planted in custom_checkpoint_0.pkl ran"

    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    torch.save(WritesMarker(marker), checkpoint / "optimizer.bin")
    with pytest.raises(CheckpointError, match=r"checkpoint-4 could not be restored \(UnpicklingError"):
        train_vae(vae_config(data=str(corpus), output_dir=str(copy_of),
                             resume_from_checkpoint="latest"))
    assert not marker.exists(), "code planted in optimizer.bin ran"


def test_truncated_checkpoint_weights_are_a_checkpoint_error(copy_of, corpus):
    weights = copy_of / "checkpoints" / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"checkpoint-4 could not be restored \(.*\); it does not match this "
                                              r"model/configuration or is damaged"):
        train_vae(vae_config(data=str(corpus), output_dir=str(copy_of), resume_from_checkpoint="latest"))


def test_resume_continues_where_the_run_stopped(checkpointed, copy_of, corpus):
    resumed = train_vae(vae_config(data=str(corpus), output_dir=str(copy_of), resume_from_checkpoint="latest"))
    assert [path.name for path in list_checkpoints(copy_of / "checkpoints")] == ["checkpoint-4", "checkpoint-8"]
    expected = load_file(checkpointed / "model.safetensors")
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_missing_rng_state_is_an_error(copy_of, corpus):
    (copy_of / "checkpoints" / "checkpoint-4" / "rng_state_0.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"rng_state_0\.safetensors \(random number generator states\) is missing"):
        train_vae(vae_config(data=str(corpus), output_dir=str(copy_of),
                             resume_from_checkpoint="latest"))


def test_changed_optimisation_settings_are_refused_then_applied_when_asked(copy_of, corpus):
    changed = {"data": str(corpus), "output_dir": str(copy_of), "resume_from_checkpoint": "latest",
               "learning_rate": 5e-3, "lr_scheduler": "constant"}
    with pytest.raises(CheckpointError, match=r"training\.learning_rate: 0\.001 in the checkpoint, 0\.005 now; "
                                              r"training\.lr_scheduler: 'cosine' in the checkpoint, 'constant' now"):
        train_vae(vae_config(**changed))
    train_vae(vae_config(**changed, resume_with_changes=True))
    logged = (copy_of / "logs" / "metrics.csv").read_text().splitlines()
    assert "8,lr,0.005" in logged, logged
    state = json.loads((copy_of / "checkpoints" / "checkpoint-8" / TRAINING_STATE_FILE).read_text())
    assert state["resumed_with_changes"][0]["step"] == 4
    assert state["resumed_with_changes"][0]["changes"]["training.learning_rate"] == [0.001, 0.005]


def test_resume_on_relabelled_data_is_refused(copy_of, pbmc_counts, tmp_path):
    """Same cells and as many labels, other names: the checkpoint's label ids would mean other labels."""
    relabelled = pbmc_counts[:NUM_CELLS].copy()
    relabelled.obs["cell_type"] = relabelled.obs["cell_type"].cat.rename_categories(lambda name: f"renamed {name}")
    anndata_to_corpus(relabelled, tmp_path / "relabelled", covariates=["cell_type"])
    with pytest.raises(CheckpointError, match=r"data\.covariates: \{'cell_type': \['CD14\+ Monocyte'"):
        train_vae(vae_config(data=str(tmp_path / "relabelled"), output_dir=str(copy_of),
                             resume_from_checkpoint="latest"))


def test_other_h5ad_into_the_same_output_dir_is_converted_again(pbmc_counts, tmp_path):
    first, second = tmp_path / "first.h5ad", tmp_path / "second.h5ad"
    pbmc_counts[:30].copy().write_h5ad(first)
    pbmc_counts[30:70].copy().write_h5ad(second)
    for path, num_cells in ((first, 30), (second, 40), (first, 30)):
        config = vae_config(data=str(path), output_dir=str(tmp_path / "out"))
        _, info = prepare_corpus(config, build_accelerator(config))
        assert (info.source, info.num_cells) == (str(path.resolve()), num_cells)
