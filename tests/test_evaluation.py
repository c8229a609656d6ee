"""Evaluation metrics, reconstruction metrics, baselines and the side-by-side training helper on Gaussian toys and
the bundled PBMC68k counts (the protocol end to end, floor and pooling, is tested under the CLI in test_cli.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scldm_hf.data import load_pbmc68k_counts
from scldm_hf.errors import ConditionError, ConfigurationError, InputDataError
from scldm_hf.evaluation import (
    NaiveNBBaseline,
    ScviGenerator,
    distribution_metrics,
    energy_distance,
    evaluate_generation,
    gene_correlation_agreement,
    gene_moment_agreement,
    log_normalize,
    mmd_rbf,
    nearest_neighbor_accuracy,
    precision_recall_density_coverage,
    real_vs_generated_auroc,
    reconstruction_metrics,
    wasserstein,
)
from scldm_hf.workflows.side_by_side import train_scldm

LABEL_KEY = "cell_type"


@pytest.fixture(scope="module")
def pbmc_splits():
    """PBMC68k counts split into three disjoint random thirds: (train, test, other)."""
    adata = load_pbmc68k_counts()
    order = np.random.default_rng(0).permutation(adata.n_obs)
    return tuple(adata[part].copy() for part in np.array_split(order, 3))


def gaussian(n, dim=10, shift=0.0, seed=0):
    return np.random.default_rng(seed).normal(size=(n, dim)) + shift / np.sqrt(dim)


def test_two_sample_metrics_grow_monotonically_with_shift():
    real = gaussian(400, seed=0)
    shifts = [0.0, 1.0, 2.0, 4.0]
    metrics = [distribution_metrics(real, gaussian(400, shift=shift, seed=1)) for shift in shifts]
    for name in ["mmd_rbf", "wasserstein_1", "wasserstein_2", "energy_distance", "nn_accuracy"]:
        values = [m[name] for m in metrics]
        assert np.all(np.diff(values) > 0), f"{name} not increasing in the shift: {values}"
    assert metrics[-1]["precision"] < metrics[0]["precision"]
    assert metrics[-1]["coverage"] < metrics[0]["coverage"]


def test_same_distribution_gives_null_values():
    real, other = gaussian(500, seed=0), gaussian(500, seed=1)
    assert abs(mmd_rbf(real, real)) < 0.02
    assert abs(mmd_rbf(real, other)) < 0.01
    assert abs(energy_distance(real, other)) < 0.05
    assert 0.42 < nearest_neighbor_accuracy(real, other) < 0.58
    assert precision_recall_density_coverage(real, real) == pytest.approx(
        {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}, abs=0.02
    )


def test_wasserstein_2_matches_gaussian_closed_form():
    mean_shift = np.array([3.0, 4.0])  # equal covariances: W2 = ||mu1 - mu2|| = 5
    rng = np.random.default_rng(0)
    real, generated = rng.normal(size=(1500, 2)), rng.normal(size=(1500, 2)) + mean_shift
    assert wasserstein(real, generated, p=2) == pytest.approx(5.0, abs=0.15)
    assert wasserstein(real, generated, p=1) <= wasserstein(real, generated, p=2) + 1e-9


def test_real_vs_generated_auroc_separates_only_different_distributions():
    real = gaussian(300, seed=0)
    assert 0.35 < real_vs_generated_auroc(real, gaussian(300, seed=1)) < 0.65
    assert real_vs_generated_auroc(real, gaussian(300, shift=10.0, seed=1)) > 0.95


def test_gene_statistics_agree_perfectly_on_identical_data(pbmc_splits):
    expression = log_normalize(pbmc_splits[0].X)
    assert gene_correlation_agreement(expression, expression, n_top_genes=100) == pytest.approx(1.0)
    assert all(value == pytest.approx(1.0) for value in gene_moment_agreement(expression, expression).values())


def test_evaluate_generation_rejects_unusable_inputs(pbmc_splits):
    train, test, other = pbmc_splits
    with pytest.raises(ConfigurationError, match="needs reference=<training cells>"):
        evaluate_generation(test, other, LABEL_KEY)
    with pytest.raises(InputDataError, match="lacks 1 of the"):
        evaluate_generation(test, other[:, 1:], LABEL_KEY, reference=train)
    with pytest.raises(ConditionError, match="not_a_column"):
        evaluate_generation(test, other, "not_a_column", reference=train)
    log_normalised = other.copy()
    log_normalised.X = log_normalize(other.X)
    with pytest.raises(InputDataError, match="non-integer"):
        evaluate_generation(test, log_normalised, LABEL_KEY, reference=train)
    with pytest.raises(ConfigurationError, match="min_cells=3 is below 6"):
        evaluate_generation(test, other, LABEL_KEY, reference=train, min_cells=3)


@pytest.mark.parametrize("side", ["real", "generated", "reference", "real_floor"])
@pytest.mark.parametrize("num_cells", [0, 1, 5])
def test_evaluation_of_too_few_cells_is_an_error(pbmc_splits, side, num_cells):
    train, test, other = pbmc_splits
    samples = {"real": test, "generated": other, "reference": train, "real_floor": other}
    samples[side] = samples[side][:num_cells].copy()
    with pytest.raises(InputDataError, match=rf"The {side} sample has {num_cells} cells; scoring needs at least 6"):
        evaluate_generation(samples["real"], samples["generated"], LABEL_KEY, reference=samples["reference"],
                            real_floor=samples["real_floor"])


def test_evaluation_without_a_label_shared_by_enough_cells_is_an_error(pbmc_splits):
    train, test, other = pbmc_splits
    labels = test.obs[LABEL_KEY].astype(str)
    real = test[labels == "CD14+ Monocyte"][:20].copy()
    generated = other[other.obs[LABEL_KEY].astype(str) == "CD19+ B"][:20].copy()
    with pytest.raises(InputDataError, match=r"No group has 6 comparable cells on every side, even with the labels "
                                             r"below min_cells pooled \(.*generated 20 -> 0.*\): pass at least 6 cells"):
        evaluate_generation(real, generated, LABEL_KEY, reference=train)


def test_unlabelled_cells_are_scored_without_the_cell_type_classifier(pbmc_splits):
    """One pooled label (data without cell types): every distance is scored; the classifier, which needs two
    labels, is left out with a note instead of failing the whole evaluation."""
    train, test, other = (cells.copy() for cells in pbmc_splits)
    for cells in (train, test, other):
        cells.obs["pooled"] = "all cells"
    table = evaluate_generation(test, other, "pooled", reference=train)
    assert np.isfinite(table.loc["mean", ["mmd_rbf", "mmd_rbf_real_floor", "classifier_auroc"]].astype(float)).all()
    assert "cell_type_f1_generated" not in table
    assert any("cell_type_f1 not scored" in note for note in table.attrs["notes"])


def test_reconstruction_metrics_reward_the_true_mean():
    rng = np.random.default_rng(0)
    mean = torch.as_tensor(rng.gamma(0.5, 4.0, size=(200, 50)), dtype=torch.float32)
    theta = torch.full((50,), 2.0)
    counts = torch.distributions.NegativeBinomial(total_count=theta, logits=mean.log() - theta.log()).sample()
    good = reconstruction_metrics(counts, mean, theta)
    bad = reconstruction_metrics(counts, mean[torch.randperm(200)], theta)
    assert good["reconstruction_pearson"] > bad["reconstruction_pearson"] + 0.2
    assert good["reconstruction_mse"] < bad["reconstruction_mse"]
    assert good["nb_nll_per_cell"] < bad["nb_nll_per_cell"]
    expected_nll = -torch.distributions.NegativeBinomial(theta, logits=mean.log() - theta.log()).log_prob(counts)
    assert good["nb_nll_per_cell"] == pytest.approx(float(expected_nll.sum(dim=1).mean()), rel=1e-4)
    perfect = reconstruction_metrics(counts, counts + 1e-6, theta)
    assert perfect["reconstruction_pearson"] == pytest.approx(1.0, abs=1e-3)
    assert perfect["reconstruction_mse"] < 1e-6


def test_naive_nb_baseline_matches_gene_means_with_integer_counts(pbmc_splits):
    train = pbmc_splits[0]
    baseline = NaiveNBBaseline(LABEL_KEY).fit(train)
    labels = train.obs[LABEL_KEY].astype(str).to_numpy()
    generated = baseline.sample(labels, seed=0)
    counts = generated.X.toarray()
    assert generated.shape == train.shape and list(generated.var_names) == list(train.var_names)
    assert np.array_equal(counts, np.round(counts)) and counts.min() >= 0
    assert list(generated.obs[LABEL_KEY].astype(str)) == list(labels)
    real_means, generated_means = np.asarray(train.X.mean(axis=0)).ravel(), counts.mean(axis=0)
    assert np.corrcoef(real_means, generated_means)[0, 1] > 0.95
    library_sizes = np.full(len(labels), 5000.0)
    assert baseline.sample(labels, library_sizes, seed=1).X.sum(axis=1).mean() == pytest.approx(5000, rel=0.05)
    assert (baseline.sample(labels, seed=0).X != generated.X).nnz == 0
    with pytest.raises(ConditionError, match="not in the training data"):
        baseline.sample(["no such cell type"])


def test_scvi_generator_samples_integer_counts_per_label(pbmc_splits):
    train = pbmc_splits[0]
    generator = ScviGenerator(LABEL_KEY, n_latent=4, n_hidden=32, max_epochs=2).fit(train)
    labels = ["CD14+ Monocyte"] * 20 + ["CD19+ B"] * 10
    generated = generator.sample(labels, seed=0)
    counts = generated.X.toarray()
    assert generated.shape == (30, train.n_vars)
    assert np.array_equal(counts, np.round(counts)) and counts.min() >= 0 and counts.sum() > 0
    assert list(generated.obs[LABEL_KEY].astype(str)) == labels

    mean, std = generator.posterior(train[:5])
    assert mean.shape == std.shape == (5, 4) and bool((std > 0).all())
    nb_mean, _ = generator.decode(mean, torch.full((5,), 1000.0))
    torch.testing.assert_close(nb_mean.sum(dim=1), torch.full((5,), 1000.0), rtol=1e-4, atol=1e-2)
    monocyte_sizes = np.asarray(train[train.obs[LABEL_KEY] == "CD14+ Monocyte"].X.sum(axis=1)).ravel()
    assert set(generator.library_sizes(labels, seed=0)[:20].tolist()) <= set(monocyte_sizes.tolist())
    assert generator.sample_latents(labels, seed=0).shape == (30, 4)


def test_train_scldm_reuses_a_trained_vae_and_retrains_the_dit(pbmc_splits, tmp_path):
    train, _, _ = pbmc_splits
    recipe = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"
    pipeline_dir = train_scldm(train, LABEL_KEY, recipe, tmp_path)
    vae_weights = tmp_path / "vae" / "model.safetensors"
    vae_written = vae_weights.stat().st_mtime_ns
    dit_weights = next((pipeline_dir / "transformer").glob("*.safetensors"))
    first_dit = load_file(dit_weights)

    again = train_scldm(train, LABEL_KEY, recipe, tmp_path, dit_overrides={"max_train_steps": 6}, reuse_vae=True)
    assert vae_weights.stat().st_mtime_ns == vae_written
    retrained = load_file(next((again / "transformer").glob("*.safetensors")))
    assert any(not torch.equal(first_dit[name], retrained[name]) for name in first_dit)

    train_scldm(train, LABEL_KEY, recipe, tmp_path, {"seed": 1}, reuse_vae=True)  # another VAE config: retrained
    assert vae_weights.stat().st_mtime_ns != vae_written
