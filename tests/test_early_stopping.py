"""Early stopping on the held-out loss: a tiny run stops once the loss stops improving, saves the best check's
weights (the EMA's for the DiT), and a run resumed from a checkpoint stops at the same step with the same weights.
Either stage can instead stop on a distance of its outputs to held-out cells (round_trip_mmd, generation_mmd)."""

import csv
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scldm_hf.data import anndata_to_corpus, load_corpus
from scldm_hf.errors import ConfigurationError
from scldm_hf.evaluation import ProtocolCardMetrics
from scldm_hf.evaluation.reconstruction import RoundTripDistance
from scldm_hf.models import SCVAEModel
from scldm_hf.pipelines import SCLDMPipeline
from scldm_hf.training import DiTTrainingConfig, FinetuneConfig, VAETrainingConfig, load_config
from scldm_hf.training.checkpointing import BEST_WEIGHTS_FILE, list_checkpoints
from scldm_hf.training.data import (
    LATENT_CACHE_DIR,
    SHARD_GLOB,
    open_arrow_shards,
    split_train_validation,
    spread_rows,
)
from scldm_hf.training.dit import (
    MAX_STOPPING_CELLS,
    reference_and_held_out_cells,
    train_dit,
    validation_flow_matching_loss,
)
from scldm_hf.training.finetune import vae_finetune_config
from scldm_hf.training.trackers import METRICS_FILE
from scldm_hf.training.vae import MAX_EVALUATION_CELLS, evaluate_vae, panel_counts, train_vae

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "tiny.yaml"
NUM_CELLS = 80
PATIENCE, VALIDATION_STEPS, MAX_STEPS = 2, 2, 400
# a learning rate far too high for the tiny model: the held-out loss soon stops improving
EARLY_STOPPING = {"early_stopping_patience": PATIENCE, "validation_steps": VALIDATION_STEPS, "max_train_steps": MAX_STEPS,
                  "validation_fraction": 0.2, "learning_rate": 0.05, "lr_scheduler": "constant", "lr_warmup_steps": 0,
                  "checkpointing_steps": 4}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, pbmc_counts) -> Path:
    path = tmp_path_factory.mktemp("early_stopping") / "corpus"
    anndata_to_corpus(pbmc_counts[:NUM_CELLS].copy(), path, covariates=["cell_type"])
    return path


def vae_config(corpus: Path, output_dir: Path, **overrides) -> VAETrainingConfig:
    return load_config(VAETrainingConfig, TINY, {**EARLY_STOPPING, "data": str(corpus), "output_dir": str(output_dir),
                                                 **overrides}, section="vae")


def validation_losses(output_dir: Path, metric: str = "validation_loss") -> dict[int, float]:
    """`{step: score}` of the held-out score `metric` logged by the run in `output_dir`."""
    with (output_dir / "logs" / METRICS_FILE).open() as file:
        return {int(row["step"]): float(row["value"]) for row in csv.DictReader(file) if row["metric"] == metric}


@pytest.fixture(scope="module")
def stopped_vae(corpus, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("early_stopping") / "vae"
    train_vae(vae_config(corpus, output_dir))
    return output_dir


def test_vae_stops_when_the_held_out_loss_stops_improving_and_keeps_the_best_weights(stopped_vae, corpus):
    losses = validation_losses(stopped_vae)
    best_step = min(losses, key=losses.get)
    last_step = max(losses)
    assert last_step < MAX_STEPS
    assert last_step == best_step + PATIENCE * VALIDATION_STEPS
    assert all(losses[step] >= losses[best_step] for step in losses if step > best_step)

    dataset, info = load_corpus(corpus)
    validation = split_train_validation(dataset, EARLY_STOPPING["validation_fraction"], seed=0)[1]
    saved = SCVAEModel.from_pretrained(stopped_vae)
    assert evaluate_vae(saved, validation, info, batch_size=10)["validation_loss"] == pytest.approx(losses[best_step],
                                                                                                   rel=1e-5)
    last_checkpoint = list_checkpoints(stopped_vae / "checkpoints")[-1]
    best = load_file(last_checkpoint / BEST_WEIGHTS_FILE)
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(value, best[name], rtol=0, atol=0, msg=name)


def test_resumed_run_stops_at_the_same_step_with_the_same_weights(stopped_vae, corpus, tmp_path):
    first = list_checkpoints(stopped_vae / "checkpoints")[0]
    target = tmp_path / "vae"
    shutil.copytree(first, target / "checkpoints" / first.name)
    resumed = train_vae(vae_config(corpus, target, resume_from_checkpoint="latest"))
    assert max(validation_losses(target)) == max(validation_losses(stopped_vae))
    expected = load_file(stopped_vae / "model.safetensors")
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_vae_stops_on_the_round_trip_distance_when_asked(corpus, tmp_path):
    """``early_stopping_metric: round_trip_mmd`` watches the MMD^2 of held-out round trips (both scores are logged)
    and keeps the weights of its best check; the saved VAE scores that MMD^2 again. The score comes from the
    evaluation layer, so training refuses it without `card_metrics`."""
    output_dir = tmp_path / "vae"
    config = vae_config(corpus, output_dir, early_stopping_metric="round_trip_mmd")
    with pytest.raises(ConfigurationError, match="pass card_metrics="):
        train_vae(config)
    train_vae(config, ProtocolCardMetrics())
    distances, losses = validation_losses(output_dir, "round_trip_mmd"), validation_losses(output_dir)
    assert distances.keys() == losses.keys()
    best_step = min(distances, key=distances.get)
    assert max(distances) == best_step + PATIENCE * VALIDATION_STEPS < MAX_STEPS

    dataset, info = load_corpus(corpus)
    train, validation = split_train_validation(dataset, EARLY_STOPPING["validation_fraction"], seed=0)
    round_trip = RoundTripDistance(panel_counts(spread_rows(train, MAX_EVALUATION_CELLS), info, 10), seed=0)
    scores = evaluate_vae(SCVAEModel.from_pretrained(output_dir), validation, info, batch_size=10, round_trip=round_trip)
    assert scores["round_trip_mmd"] == pytest.approx(distances[best_step], rel=1e-4, abs=1e-6)


def test_round_trip_distance_is_lowest_for_the_true_means(pbmc_counts):
    """Counts drawn around the cells' own counts are closer to them than draws around other cells', which are far
    closer than draws around gene-shuffled counts."""
    counts = torch.as_tensor(pbmc_counts.X[:120].toarray())
    round_trip = RoundTripDistance(torch.as_tensor(pbmc_counts.X[200:400].toarray()), seed=0)
    other_cells = torch.as_tensor(pbmc_counts.X[400:520].toarray())
    shuffled_genes = counts[:, torch.randperm(counts.shape[1], generator=torch.Generator().manual_seed(0))]
    near_poisson = torch.tensor(100.0)
    distances = [round_trip(counts, means, near_poisson) for means in (counts, other_cells, shuffled_genes)]
    assert distances == sorted(distances)
    assert distances[2] > 10 * distances[1]


def test_dit_early_stopping_keeps_the_best_ema_weights(stopped_vae, corpus, tmp_path):
    output_dir = tmp_path / "pipeline"
    config = load_config(DiTTrainingConfig, TINY, {
        **EARLY_STOPPING, "learning_rate": 0.02, "data": str(corpus),
        "vae_name_or_path": str(stopped_vae), "output_dir": str(output_dir)}, section="dit")
    train_dit(config)
    losses = validation_losses(output_dir)
    best_step = min(losses, key=losses.get)
    assert max(losses) == best_step + PATIENCE * VALIDATION_STEPS < MAX_STEPS
    pipeline = SCLDMPipeline.from_pretrained(output_dir)
    shards = sorted((output_dir / LATENT_CACHE_DIR).glob(SHARD_GLOB))
    cache = open_arrow_shards(shards).with_format("numpy", columns=["latents", "cell_type"])
    validation = split_train_validation(cache, EARLY_STOPPING["validation_fraction"], seed=0)[1]
    loss = validation_flow_matching_loss(pipeline.transformer, validation, ["cell_type"], config.batch_size,
                                         config.seed, pipeline.vae.normalize_latents)
    assert loss == pytest.approx(losses[best_step], rel=1e-5)


def test_dit_stops_on_the_generation_distance_when_asked(stopped_vae, corpus, tmp_path):
    """``early_stopping_metric: generation_mmd`` watches the MMD^2 of held-out cells and cells generated for their
    labels (both scores logged) and keeps the best check's EMA weights: the saved pipeline scores that MMD^2 again.
    It needs the evaluation layer's card_metrics and a conditioned model."""
    output_dir = tmp_path / "pipeline"
    overrides = {**EARLY_STOPPING, "learning_rate": 0.02, "data": str(corpus), "vae_name_or_path": str(stopped_vae),
                 "output_dir": str(output_dir), "early_stopping_metric": "generation_mmd", "eval_inference_steps": 4}
    config = load_config(DiTTrainingConfig, TINY, overrides, section="dit")
    with pytest.raises(ConfigurationError, match="card_metrics="):
        train_dit(config)
    with pytest.raises(ConfigurationError, match="conditioned model"):
        train_dit(load_config(DiTTrainingConfig, TINY, {**overrides, "condition_on": []}, section="dit"),
                  ProtocolCardMetrics())
    train_dit(config, ProtocolCardMetrics())
    distances, losses = validation_losses(output_dir, "generation_mmd"), validation_losses(output_dir)
    assert distances.keys() == losses.keys()
    assert len(set(distances.values())) > 1  # it scores the weights of each check
    best_step = min(distances, key=distances.get)
    assert max(distances) == best_step + PATIENCE * VALIDATION_STEPS < MAX_STEPS

    dataset, info = load_corpus(corpus)
    reference, held_out = reference_and_held_out_cells(dataset, info, ["cell_type"], config, MAX_STOPPING_CELLS)
    score = ProtocolCardMetrics().generation_distance(reference, held_out, ["cell_type"], num_inference_steps=4,
                                                      seed=config.seed)
    assert score(SCLDMPipeline.from_pretrained(output_dir)) == pytest.approx(distances[best_step], rel=1e-4, abs=1e-6)


def test_a_finetuned_vae_stops_on_its_own_loss_when_the_dit_watches_generation(tmp_path):
    config = FinetuneConfig(output_dir=str(tmp_path), data="pbmc68k", pipeline_name_or_path="pipeline",
                            early_stopping_patience=2, early_stopping_metric="generation_mmd")
    assert vae_finetune_config(config, tmp_path).early_stopping_metric == "validation_loss"


def test_early_stopping_metric_must_be_a_score_of_the_stage(corpus, tmp_path):
    with pytest.raises(ConfigurationError, match="not a held-out score of this stage"):
        load_config(DiTTrainingConfig, TINY, {**EARLY_STOPPING, "data": str(corpus), "vae_name_or_path": "vae",
                                              "output_dir": str(tmp_path), "early_stopping_metric": "round_trip_mmd"},
                    section="dit")


def test_early_stopping_needs_held_out_cells(corpus, tmp_path):
    with pytest.raises(ConfigurationError, match="early_stopping_patience needs held-out cells"):
        vae_config(corpus, tmp_path, validation_fraction=0.0)
