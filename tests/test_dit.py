"""LatentDiTTransformer, the flow-matching objective, the diffusers schedulers and CellConditioner (no VAE needed)."""

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from scldm_hf.errors import ConditionError, ConfigurationError, InputDataError
from scldm_hf.flow_matching import (
    add_noise,
    couple_noise,
    drop_covariates,
    flow_matching_loss,
    optimal_transport_pairing,
    sample_sigmas,
)
from scldm_hf.models.conditioning import CellConditioner, LibrarySizeMoments
from scldm_hf.models.transformer_latent_dit import LatentDiTTransformer

NUM_TOKENS, LATENT_DIM = 4, 6


def tiny_transformer(covariate_num_labels=None, seed: int = 0) -> LatentDiTTransformer:
    """A 1-block DiT whose zero-initialised layers are randomised, so outputs depend on every input."""
    torch.manual_seed(seed)
    model = LatentDiTTransformer(
        num_latent_tokens=NUM_TOKENS,
        latent_dim=LATENT_DIM,
        hidden_size=32,
        num_layers=1,
        num_attention_heads=4,
        timestep_embedding_dim=32,
        covariate_num_labels=covariate_num_labels if covariate_num_labels is not None else {"cell_type": 3},
    )
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(std=0.1)
    return model.eval()


def velocity(model, latents, timestep=500.0, covariates=None):
    with torch.no_grad():
        return model(latents, torch.full((len(latents),), timestep), covariates=covariates).sample


def test_fresh_transformer_predicts_zero_velocity_of_latent_shape():
    model = LatentDiTTransformer(num_latent_tokens=NUM_TOKENS, latent_dim=LATENT_DIM, hidden_size=32, num_layers=2)
    output = model(torch.randn(3, NUM_TOKENS, LATENT_DIM), torch.tensor([0.0, 500.0, 1000.0]))
    assert output.sample.shape == (3, NUM_TOKENS, LATENT_DIM)
    assert torch.equal(output.sample, torch.zeros_like(output.sample))  # adaLN-Zero + zero output layer


def test_missing_covariate_means_null_label_and_labels_change_the_prediction():
    model = tiny_transformer()
    latents = torch.randn(2, NUM_TOKENS, LATENT_DIM)
    null = velocity(model, latents, covariates={"cell_type": torch.tensor([3, 3])})
    assert torch.equal(velocity(model, latents), null)
    assert not torch.allclose(velocity(model, latents, covariates={"cell_type": torch.tensor([0, 1])}), null)
    assert not torch.allclose(velocity(model, latents, timestep=100.0), null)


def test_unknown_covariate_is_rejected():
    with pytest.raises(ConditionError, match="no covariate.*'batch'.*cell_type"):
        tiny_transformer()(torch.randn(1, NUM_TOKENS, LATENT_DIM), 10.0, covariates={"batch": torch.tensor([0])})
    with pytest.raises(ConfigurationError, match="without '.'"):
        LatentDiTTransformer(covariate_num_labels={"cell.type": 2})


def test_adding_labels_keeps_old_embeddings_bit_identical(tmp_path):
    model = tiny_transformer()
    old_table = model.covariate_embedders["cell_type"].weight.detach().clone()
    latents = torch.randn(5, NUM_TOKENS, LATENT_DIM)
    old_labels = {"cell_type": torch.tensor([0, 1, 2, 0, 1])}
    before = velocity(model, latents, covariates=old_labels)
    null_before = velocity(model, latents)

    model.add_covariate_labels("cell_type", 2)

    table = model.covariate_embedders["cell_type"].weight
    assert model.config.covariate_num_labels == {"cell_type": 5}
    assert table.shape[0] == 6 and torch.equal(table[:3], old_table[:3])
    assert torch.equal(velocity(model, latents, covariates=old_labels), before)
    assert torch.equal(velocity(model, latents), null_before)  # null moved to id 5, same embedding
    assert torch.equal(velocity(model, latents, covariates={"cell_type": torch.full((5,), 3)}), null_before)

    model.save_pretrained(tmp_path)
    reloaded = LatentDiTTransformer.from_pretrained(tmp_path)
    assert not reloaded.training
    assert torch.equal(velocity(reloaded, latents, covariates=old_labels), before)


def test_adding_a_covariate_leaves_predictions_unchanged(tmp_path):
    model = tiny_transformer()
    latents = torch.randn(3, NUM_TOKENS, LATENT_DIM)
    labels = {"cell_type": torch.tensor([0, 2, 3])}
    before = velocity(model, latents, covariates=labels)
    model.add_covariate("perturbation", 4)
    assert model.config.covariate_num_labels == {"cell_type": 3, "perturbation": 4}
    assert torch.equal(velocity(model, latents, covariates={**labels, "perturbation": torch.tensor([0, 3, 4])}), before)
    with pytest.raises(ConditionError, match="already has"):
        model.add_covariate("perturbation", 1)
    model.save_pretrained(tmp_path)
    assert LatentDiTTransformer.from_pretrained(tmp_path).config.covariate_num_labels["perturbation"] == 4


# --- flow-matching objective ---


def test_add_noise_matches_the_scheduler_forward_process():
    scheduler = FlowMatchEulerDiscreteScheduler()
    latents, noise = torch.randn(2, NUM_TOKENS, LATENT_DIM), torch.randn(2, NUM_TOKENS, LATENT_DIM)
    timesteps = scheduler.timesteps[[100, 900]]
    expected = scheduler.scale_noise(latents, timesteps, noise)
    torch.testing.assert_close(add_noise(latents, noise, timesteps / 1000), expected)
    assert torch.equal(add_noise(latents, noise, torch.ones(2)), noise)
    assert torch.equal(add_noise(latents, noise, torch.zeros(2)), latents)


def test_timestep_sampling_uniform_and_logit_normal():
    generator = torch.Generator().manual_seed(0)
    uniform = sample_sigmas(20_000, "uniform", generator=generator)
    logit_normal = sample_sigmas(20_000, "logit_normal", generator=generator)
    for sigmas in (uniform, logit_normal):
        assert sigmas.min() >= 0 and sigmas.max() <= 1
    assert abs(float((uniform < 0.1).float().mean()) - 0.1) < 0.01
    # logit-normal(0, 1) puts ~1.4% of the mass below 0.1 and concentrates around 0.5
    assert float((logit_normal < 0.1).float().mean()) < 0.03
    assert abs(float(logit_normal.median()) - 0.5) < 0.02
    with pytest.raises(ConfigurationError, match="timestep_sampling"):
        sample_sigmas(4, "cosine")


def test_condition_dropout_joint_and_independent():
    batch = 20_000
    covariates = {"cell_type": torch.zeros(batch, dtype=torch.long), "donor": torch.zeros(batch, dtype=torch.long)}
    num_labels = {"cell_type": 3, "donor": 7}
    generator = torch.Generator().manual_seed(0)
    joint = drop_covariates(covariates, num_labels, 0.3, "joint", generator)
    cell_type_dropped, donor_dropped = joint["cell_type"] == 3, joint["donor"] == 7
    assert torch.equal(cell_type_dropped, donor_dropped)
    assert abs(float(cell_type_dropped.float().mean()) - 0.3) < 0.02

    independent = drop_covariates(covariates, num_labels, 0.3, "independent", generator)
    cell_type_dropped, donor_dropped = independent["cell_type"] == 3, independent["donor"] == 7
    assert abs(float(cell_type_dropped.float().mean()) - 0.3) < 0.02
    assert abs(float((cell_type_dropped & donor_dropped).float().mean()) - 0.09) < 0.015
    assert torch.equal(drop_covariates(covariates, num_labels, 0.0)["donor"], covariates["donor"])
    with pytest.raises(ConfigurationError, match="mode"):
        drop_covariates(covariates, num_labels, 0.1, "per_cell")
    with pytest.raises(ConditionError, match=r"\['donor'\] are unknown"):
        drop_covariates(covariates, {"cell_type": 3}, 0.1)


def test_flow_matching_loss_is_reproducible_and_trains_the_transformer():
    model = tiny_transformer().train()
    latents = torch.randn(16, NUM_TOKENS, LATENT_DIM)
    labels = {"cell_type": torch.randint(0, 3, (16,))}

    def loss(seed):
        return flow_matching_loss(model, latents, labels, "logit_normal", generator=torch.Generator().manual_seed(seed))

    assert torch.equal(loss(0), loss(0)) and not torch.equal(loss(0), loss(1))
    loss(0).backward()
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in model.parameters())


# --- noise-latent coupling ---


def pairing_cost(latents, noise, pairing):
    """Total squared distance `sum_i ||latents[i] - noise[pairing[i]]||^2`."""
    return float((latents - noise[torch.as_tensor(list(pairing))]).square().sum())


def brute_force_cost(latents, noise, members):
    """The least pairing cost of the cells `members` with their own noise rows, over every permutation."""
    return min(pairing_cost(latents[members], noise[members], order)
               for order in itertools.permutations(range(len(members))))


def test_minibatch_ot_pairs_each_latent_with_noise_at_the_least_total_squared_distance():
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(7, NUM_TOKENS, LATENT_DIM, generator=generator, dtype=torch.float64) + 1.0
    noise = torch.randn(7, NUM_TOKENS, LATENT_DIM, generator=generator, dtype=torch.float64)
    pairing = optimal_transport_pairing(latents, noise)
    assert sorted(pairing.tolist()) == list(range(7))  # a permutation: every noise row is used once
    cost = pairing_cost(latents, noise, pairing)
    assert cost < pairing_cost(latents, noise, range(7))  # strictly better than the draws' order here
    assert cost == pytest.approx(brute_force_cost(latents, noise, list(range(7))), rel=1e-12)


def test_minibatch_ot_by_label_pairs_within_each_label_optimally():
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(9, NUM_TOKENS, LATENT_DIM, generator=generator, dtype=torch.float64)
    noise = torch.randn(9, NUM_TOKENS, LATENT_DIM, generator=generator, dtype=torch.float64)
    covariates = {"cell_type": torch.tensor([0, 1, 0, 1, 1, 0, 2, 0, 1]), "donor": torch.tensor([0] * 8 + [1])}
    coupled = couple_noise(latents, noise, "minibatch_ot_by_label", covariates)
    pairing = [int(torch.nonzero((noise == row).all(dim=-1).all(dim=-1))) for row in coupled]
    groups = [[0, 2, 5, 7], [1, 3, 4], [6], [8]]  # (cell_type, donor) combinations
    for members in groups:
        assert sorted(pairing[i] for i in members) == members, "noise crossed a label group"
        assert pairing_cost(latents[members], coupled[members], range(len(members))) == pytest.approx(
            brute_force_cost(latents, noise, members), rel=1e-12)
    across_labels = pairing_cost(latents, couple_noise(latents, noise, "minibatch_ot", covariates), range(9))
    assert across_labels <= pairing_cost(latents, coupled, range(9)) <= pairing_cost(latents, noise, range(9))
    assert couple_noise(latents, noise, "independent", covariates) is noise
    with pytest.raises(ConfigurationError, match="coupling='sinkhorn' is not one of"):
        couple_noise(latents, noise, "sinkhorn", covariates)


@pytest.mark.parametrize("coupling", ["minibatch_ot", "minibatch_ot_by_label"])
def test_coupled_loss_permutes_the_noise_and_keeps_latents_with_their_labels(coupling):
    """The loss is the velocity error of the latents, in their order and with their own labels, against the
    re-paired noise: the same random draws as independent coupling, only the noise rows reordered."""
    model = tiny_transformer()
    latents = torch.randn(12, NUM_TOKENS, LATENT_DIM) * 2 + 1
    labels = {"cell_type": torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(2))}

    def loss(**kwargs):
        return flow_matching_loss(model, latents, labels, condition_dropout=0.0,
                                  generator=torch.Generator().manual_seed(3), **kwargs)

    generator = torch.Generator().manual_seed(3)
    noise = couple_noise(latents, torch.randn(latents.shape, generator=generator), coupling, labels)
    sigmas = sample_sigmas(12, generator=generator)
    prediction = model(add_noise(latents, noise, sigmas), timestep=sigmas * 1000, covariates=labels).sample
    with torch.no_grad():
        torch.testing.assert_close(loss(coupling=coupling), torch.nn.functional.mse_loss(prediction, noise - latents))
        assert torch.equal(loss(), loss(coupling="independent"))  # the default is unchanged
        assert not torch.equal(loss(), loss(coupling=coupling))


# --- schedulers ---


@pytest.mark.parametrize("scheduler_class", [FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler])
def test_scheduler_integrates_straight_flow_exactly(scheduler_class):
    """The exact velocity of a straight path from `noise` to `data`, `(x - data) / sigma`, is integrated exactly."""
    scheduler = scheduler_class()
    scheduler.set_timesteps(4)
    assert scheduler.timesteps[0] == 1000  # sigma = 1: pure noise
    data, noise = torch.randn(3, NUM_TOKENS, LATENT_DIM), torch.randn(3, NUM_TOKENS, LATENT_DIM)
    sample = noise
    for timestep in scheduler.timesteps:
        sample = scheduler.step((sample - data) / (timestep / 1000), timestep, sample).prev_sample
    torch.testing.assert_close(sample, data, atol=1e-5, rtol=0)


def test_scheduler_save_load_round_trip(tmp_path):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.save_pretrained(tmp_path)
    reloaded = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    assert reloaded.config.shift == 3.0
    scheduler.set_timesteps(7)
    reloaded.set_timesteps(7)
    assert torch.equal(scheduler.sigmas, reloaded.sigmas)
    heun = FlowMatchHeunDiscreteScheduler.from_config(reloaded.config)
    heun.set_timesteps(7)
    assert heun.config.shift == 3.0 and len(heun.timesteps) == 13


# --- conditioner ---


@pytest.fixture
def conditioner() -> CellConditioner:
    """Two covariates; library sizes exp(N(log 1000, 0.1)) for T cells, exp(N(log 8000, 0.3)) for B/ctrl."""
    generator = torch.Generator().manual_seed(0)
    cell_type = torch.tensor([0] * 400 + [1] * 400)  # T, B
    condition = torch.tensor([0, 1] * 200 + [0] * 400)  # ctrl/stim for T; ctrl only for B
    log_size = torch.where(cell_type == 0, np.log(1000.0), np.log(8000.0))
    log_size += torch.where(cell_type == 0, 0.1, 0.3) * torch.randn(800, generator=generator, dtype=torch.float64)
    conditioner = CellConditioner(covariate_labels={"cell_type": ["T", "B"], "condition": ["ctrl", "stim"]})
    conditioner.fit_library_size({"cell_type": cell_type, "condition": condition}, log_size.exp())
    return conditioner


def test_library_size_moments_fed_in_batches_equal_the_whole_column():
    """Stage 2 fits the library-size model batch by batch (flat memory on atlases): any batching gives the groups
    of one pass over all cells (sorted label ids, counts, log mean and variance)."""
    generator = torch.Generator().manual_seed(2)
    cell_type, condition = torch.randint(0, 3, (500,), generator=generator), torch.randint(0, 2, (500,), generator=generator)
    library_size = torch.randint(1, 10_000, (500,), generator=generator).double()
    whole = LibrarySizeMoments(["cell_type", "condition"])
    whole.add({"cell_type": cell_type, "condition": condition}, library_size)
    batched = LibrarySizeMoments(["cell_type", "condition"])
    for rows in torch.randperm(500, generator=generator).split(37):  # shuffled, uneven batches
        batched.add({"cell_type": cell_type[rows], "condition": condition[rows]}, library_size[rows])
    for expected, got in zip(whole.groups(), batched.groups()):
        torch.testing.assert_close(got, expected)
    label_ids, num_cells, log_mean, _ = whole.groups()
    assert label_ids.shape == (6, 2) and num_cells.sum() == 500
    first = (cell_type == label_ids[0, 0]) & (condition == label_ids[0, 1])
    torch.testing.assert_close(log_mean[0], library_size[first].log().mean())
    pooled = LibrarySizeMoments([])
    pooled.add({}, library_size)
    assert pooled.groups()[0].shape == (1, 0) and pooled.groups()[1].item() == 500
    # a label seen in a single cell borrows the pooled within-group variance instead of drawing one depth
    with_single = LibrarySizeMoments(["cell_type"])
    with_single.add({"cell_type": torch.tensor([0, 0, 0, 1])}, torch.tensor([100.0, 200.0, 400.0, 50.0]))
    _, num_cells, _, log_var = with_single.groups()
    assert num_cells.tolist() == [3, 1]
    torch.testing.assert_close(log_var[1], log_var[0])
    assert float(log_var[0]) > 0


def latent_depth_cells(num_cells: int, generator: torch.Generator):
    """Two cell types whose log library size is a type intercept plus a linear function of 6 latent features
    (whose means also differ by type), with noise sd 0.05: `(cell_type [N], features [N, 6], library size [N],
    true weight [6])`."""
    cell_type = torch.randint(0, 2, (num_cells,), generator=generator)
    features = torch.randn(num_cells, 6, generator=generator, dtype=torch.float64) + 2.0 * cell_type[:, None]
    weight = torch.tensor([0.8, -0.5, 0.0, 0.3, 0.0, 0.1], dtype=torch.float64)
    log_size = torch.where(cell_type == 0, np.log(2000.0), np.log(500.0)) + (features - 2.0 * cell_type[:, None]) @ weight
    log_size += 0.05 * torch.randn(num_cells, generator=generator, dtype=torch.float64)
    return cell_type, features, log_size.exp(), weight


def batches_of(cell_type, features, library_size, batch_size):
    def batches():
        for rows in torch.arange(len(cell_type)).split(batch_size):
            yield {"cell_type": cell_type[rows]}, library_size[rows], features[rows]
    return batches


def test_latent_library_size_model_learns_depth_within_each_cell_type(tmp_path):
    """A pooled label hides depth differences between cell states; the latent model recovers the within-type
    dependence (not the between-type shift, which the per-type log-normal keeps), batch-size independently, and
    its draws for given latents follow it (the label-only model would draw sd ~0.9 around the type mean)."""
    generator = torch.Generator().manual_seed(3)
    cell_type, features, library_size, weight = latent_depth_cells(3000, generator)
    fits = []
    for batch_size in (3000, 401):
        conditioner = CellConditioner(covariate_labels={"cell_type": ["T", "B"]})
        conditioner.fit_latent_library_size(batches_of(cell_type, features, library_size, batch_size))
        fits.append(conditioner)
    torch.testing.assert_close(fits[0].latent_library_weight, fits[1].latent_library_weight)
    conditioner = fits[0]
    assert conditioner.uses_latents and conditioner.config.num_latent_features == 6
    torch.testing.assert_close(conditioner.latent_library_weight.double(), weight, atol=0.01, rtol=0)
    assert conditioner.group_log_var.sqrt().max() < 0.06  # what the latents leave is the noise alone

    cells = torch.tensor([0] * 2000 + [1] * 2000)
    latent_features = torch.randn(4000, 6, generator=generator) + 2.0 * cells[:, None]
    drawn = conditioner.sample_library_size({"cell_type": cells}, 4000, generator, latent_features=latent_features)
    expected = torch.where(cells == 0, np.log(2000.0), np.log(500.0)) + (latent_features - 2.0 * cells[:, None]).double() @ weight
    residual = drawn.log().double() - expected
    assert abs(float(residual.mean())) < 0.01 and float(residual.std()) < 0.07
    far = conditioner.sample_library_size({"cell_type": cells[:1]}, 1, generator, latent_features=100 * latent_features[:1])
    assert float(far.log()) < float(library_size.log().max()) + 0.5  # off-manifold latents are clamped
    with pytest.raises(ConditionError, match="pass latent_features"):
        conditioner.sample_library_size({"cell_type": cells}, 4000, generator)
    with pytest.raises(InputDataError, match=r"\[cells, 6\]"):
        conditioner.sample_library_size({"cell_type": cells[:2]}, 2, generator, latent_features=torch.zeros(2, 5))

    conditioner.save_pretrained(tmp_path)
    reloaded = CellConditioner.from_pretrained(tmp_path)
    for name in ("latent_library_weight", "latent_offset_range", "group_log_mean", "group_log_var"):
        assert torch.equal(getattr(reloaded, name), getattr(conditioner, name)), name


def test_new_library_size_groups_keep_the_latent_weight():
    """Fine-tuning adds the groups of new cells (a new cell type) measured after the latent model's share."""
    generator = torch.Generator().manual_seed(4)
    cell_type, features, library_size, _ = latent_depth_cells(2000, generator)
    conditioner = CellConditioner(covariate_labels={"cell_type": ["T", "B"]})
    conditioner.fit_latent_library_size(batches_of(cell_type, features, library_size, 500))
    weight, old_means = conditioner.latent_library_weight.clone(), conditioner.group_log_mean.clone()
    conditioner.add_labels("cell_type", ["NK"])
    new_type = torch.full((300,), 2)
    new_features = 0.5 * torch.randn(300, 6, generator=generator, dtype=torch.float64)  # inside the fitted range
    new_sizes = (np.log(4000.0) + new_features @ weight.double()).exp()
    conditioner.add_library_size_groups(batches_of(new_type, new_features, new_sizes, 128))
    assert torch.equal(conditioner.latent_library_weight, weight)
    assert torch.equal(conditioner.group_log_mean[:2], old_means)
    assert conditioner.group_label_ids[2].tolist() == [2] and conditioner.config.num_library_size_groups == 3
    assert abs(float(conditioner.group_log_mean[2]) - np.log(4000.0)) < 1e-3


def test_latent_library_size_ridge_is_chosen_by_cross_validation_and_its_noise_matches_new_cells():
    """With many latent features and few cells (Kang's selection split: ~640 cells, 128 features) ridge 1 overfits
    and the residual spread of the fit's own cells underestimates the depth noise. The GCV ridge predicts the
    held-out cells' depth better (lower NLL), and the noise drawn is the true one (residuals scaled to unbiased)."""
    generator = torch.Generator().manual_seed(5)
    num_cells, num_features = 600, 128
    features = torch.randn(2 * num_cells, num_features, generator=generator, dtype=torch.float64)
    cell_type = torch.randint(0, 2, (2 * num_cells,), generator=generator)
    weight = torch.zeros(num_features, dtype=torch.float64)
    weight[:3] = 0.3
    log_size = 7.0 + cell_type.double() + features @ weight + 0.3 * torch.randn(2 * num_cells, generator=generator,
                                                                                 dtype=torch.float64)
    fit, held_out = torch.arange(num_cells), torch.arange(num_cells, 2 * num_cells)
    scores = {}
    for ridge in (1.0, None):
        conditioner = CellConditioner(covariate_labels={"cell_type": ["T", "B"]})
        chosen = conditioner.fit_latent_library_size(
            batches_of(cell_type[fit], features[fit], log_size[fit].exp(), 256), ridge=ridge)
        mean, var = conditioner.log_library_size_distribution(
            {"cell_type": cell_type[held_out]}, num_cells, features[held_out].float())
        residual = log_size[held_out] - mean.double()
        nll = 0.5 * (torch.log(2 * torch.pi * var.double()) + residual**2 / var.double())
        scores[ridge] = (chosen, float(nll.mean()), float(var.double().mean().sqrt()))
        assert conditioner.config.latent_library_ridge == chosen  # saved with the pipeline
    assert scores[1.0][0] == 1.0 and scores[None][0] > 3.0
    assert scores[None][1] < scores[1.0][1]
    # the noise drawn is the true 0.3 (the fit's own residuals: ~0.27 at ~120 effective parameters of 600 cells)
    assert abs(scores[None][2] - 0.3) < 0.015


def test_nearest_library_size_model_draws_depths_of_the_nearest_training_cells_of_the_label(tmp_path):
    """The nearest-cell model gives a generated latent the depth of one of its 5 nearest training cells of its label
    (so depth follows cell state without a linear fit); labels without reference cells fall back to the log-normals;
    it saves and reloads, and draws one normal per cell like the other models (a seeded generation's later draws do
    not depend on the model)."""
    generator = torch.Generator().manual_seed(6)
    cell_type, features, library_size, weight = latent_depth_cells(3000, generator)
    conditioner = CellConditioner(covariate_labels={"cell_type": ["T", "B"]})
    conditioner.fit_nearest_library_size(batches_of(cell_type, features, library_size, 401))
    assert conditioner.library_size_model == "nearest" and conditioner.uses_latents
    assert conditioner.reference_features.shape == (3000, 6) and conditioner.config.library_size_neighbours == 5
    torch.testing.assert_close(conditioner.reference_log_library_size.double(), library_size.log(), rtol=0, atol=1e-4)

    cells = torch.tensor([0] * 2000 + [1] * 2000)
    latent_features = (torch.randn(4000, 6, generator=generator) + 2.0 * cells[:, None]).float()
    drawn = conditioner.sample_library_size({"cell_type": cells}, 4000, generator, latent_features=latent_features)
    def distance_to_training_depths(drawn, labels):
        """`[n]`: distance of each drawn log depth to the nearest log depth of a training cell of its label."""
        gaps = (drawn.log().double()[:, None] - library_size.log()[None, :]).abs()
        return gaps.masked_fill(labels[:, None] != cell_type[None, :], np.inf).min(dim=1).values

    assert float(distance_to_training_depths(drawn, cells).max()) < 1e-4  # a training cell's depth, of its label
    expected = torch.where(cells == 0, np.log(2000.0), np.log(500.0)) + (latent_features - 2.0 * cells[:, None]).double() @ weight
    residual = drawn.log().double() - expected
    labels_only = CellConditioner(covariate_labels={"cell_type": ["T", "B"]})
    labels_only.fit_library_size({"cell_type": cell_type}, library_size)
    labels_residual = labels_only.sample_library_size({"cell_type": cells}, 4000, generator).log().double() - expected
    assert float(residual.std()) < 0.5 * float(labels_residual.std())  # depth follows the latent

    seeded = [torch.Generator().manual_seed(0) for _ in range(2)]
    conditioner.sample_library_size({"cell_type": cells[:50]}, 50, seeded[0], latent_features=latent_features[:50])
    labels_only.sample_library_size({"cell_type": cells[:50]}, 50, seeded[1])
    assert torch.equal(torch.randn(5, generator=seeded[0]), torch.randn(5, generator=seeded[1]))
    with pytest.raises(ConditionError, match="pass latent_features"):
        conditioner.sample_library_size({"cell_type": cells}, 4000, generator)
    with pytest.raises(InputDataError, match=r"\[cells, 6\]"):
        conditioner.sample_library_size({"cell_type": cells[:2]}, 2, generator, latent_features=torch.zeros(2, 5))
    with pytest.raises(ConditionError, match="not a log-normal"):
        conditioner.log_library_size_distribution({"cell_type": cells}, 4000, latent_features)

    conditioner.save_pretrained(tmp_path)
    reloaded = CellConditioner.from_pretrained(tmp_path)
    for name in ("reference_label_ids", "reference_features", "reference_log_library_size", "group_log_mean"):
        assert torch.equal(getattr(reloaded, name), getattr(conditioner, name)), name
    again = [model.sample_library_size({"cell_type": cells[:50]}, 50, torch.Generator().manual_seed(1),
                                       latent_features=latent_features[:50]) for model in (conditioner, reloaded)]
    assert torch.equal(again[0], again[1])

    # a new label has no reference cells (the pooled log-normal), a new covariate matches every reference cell
    reloaded.add_labels("cell_type", ["NK"])
    reloaded.add_covariate("condition", ["control", "stimulated"])
    assert reloaded.reference_label_ids.shape == (3000, 2) and (reloaded.reference_label_ids[:, 1] == -1).all()
    new = reloaded.sample_library_size({"cell_type": torch.tensor([2, 1]), "condition": torch.tensor([1, 1])}, 2,
                                       generator, latent_features=latent_features[[0, 3999]])
    assert float(distance_to_training_depths(new[1:], torch.tensor([1]))) < 1e-4 and torch.isfinite(new).all()
    # fine-tuning on the new label adds its cells as reference cells: its draws are then its own cells' depths
    nk_type, nk_features = torch.full((300,), 2), torch.randn(300, 6, generator=generator, dtype=torch.float64)
    nk_sizes = (np.log(4000.0) + nk_features @ weight + 0.05 * torch.randn(300, generator=generator,
                                                                           dtype=torch.float64)).exp()
    reloaded.add_library_size_groups(lambda: [({"cell_type": nk_type, "condition": torch.full((300,), 1)}, nk_sizes,
                                               nk_features)])
    assert reloaded.config.num_reference_cells == 3300 and reloaded.config.num_library_size_groups == 3
    nk_drawn = reloaded.sample_library_size({"cell_type": torch.full((20,), 2)}, 20, generator,
                                            latent_features=nk_features[:20].float())
    assert (nk_drawn.log().double()[:, None] - nk_sizes.log()[None, :]).abs().min(dim=1).values.max() < 1e-4


def test_nearest_library_size_model_keeps_a_uniform_sample_of_reference_cells():
    """Beyond `max_cells` training cells the reference cells are a uniform sample (both labels in proportion), the
    same for the same seed, whatever the batch size; a latent conditioner refuses the nearest-cell fit."""
    generator = torch.Generator().manual_seed(7)
    cell_type, features, library_size, _ = latent_depth_cells(3000, generator)
    samples = []
    for batch_size in (3000, 3000, 256):
        conditioner = CellConditioner(covariate_labels={"cell_type": ["T", "B"]})
        conditioner.fit_nearest_library_size(batches_of(cell_type, features, library_size, batch_size), max_cells=500)
        samples.append(conditioner)
    assert samples[0].config.num_reference_cells == 500
    assert torch.equal(samples[0].reference_features, samples[1].reference_features)
    fraction_b = float(samples[0].reference_label_ids.float().mean())
    assert abs(fraction_b - float(cell_type.float().mean())) < 0.06
    assert int(samples[0].group_num_cells.sum()) == 3000  # the log-normal fallback sees every cell
    latent = CellConditioner(covariate_labels={"cell_type": ["T", "B"]})
    latent.fit_latent_library_size(batches_of(cell_type, features, library_size, 3000))
    with pytest.raises(ConditionError, match="fresh CellConditioner"):
        latent.fit_nearest_library_size(batches_of(cell_type, features, library_size, 3000))


def test_conditioner_encodes_dicts_and_dataframes(conditioner):
    ids = conditioner.encode({"cell_type": ["B", "T", "B"], "condition": ["stim", "ctrl", "ctrl"]})
    assert torch.equal(ids["cell_type"], torch.tensor([1, 0, 1]))
    assert torch.equal(ids["condition"], torch.tensor([1, 0, 0]))
    frame = pd.DataFrame({"cell_type": pd.Categorical(["T", "B"])})
    assert list(conditioner.encode(frame)) == ["cell_type"]
    assert torch.equal(conditioner.encode({"cell_type": "B"}, num_cells=3)["cell_type"], torch.tensor([1, 1, 1]))


def test_conditioner_errors_name_the_known_labels(conditioner):
    with pytest.raises(ConditionError, match=r"Unknown label.*'NK'.*'cell_type'.*known labels: 'T', 'B'"):
        conditioner.encode({"cell_type": ["T", "NK"]})
    with pytest.raises(ConditionError, match=r"unknown \['donor'\].*\['cell_type', 'condition'\]"):
        conditioner.encode({"donor": ["d1"]})
    with pytest.raises(ConditionError, match="different lengths"):
        conditioner.encode({"cell_type": ["T", "B"], "condition": ["ctrl"]})
    with pytest.raises(ConditionError, match="num_cells=3"):
        conditioner.encode({"cell_type": ["T", "B"]}, num_cells=3)
    with pytest.raises(InputDataError, match="library size <= 0"):
        conditioner.fit_library_size({"cell_type": torch.tensor([0]), "condition": torch.tensor([0])}, torch.zeros(1))


def test_library_size_model_per_condition_with_global_fallback(conditioner):
    generator = torch.Generator().manual_seed(1)

    def log_sizes(labels):
        return conditioner.sample_library_size(conditioner.encode(labels, num_cells=4000), 4000, generator).log()

    t_cells, b_cells = log_sizes({"cell_type": "T"}), log_sizes({"cell_type": "B", "condition": "ctrl"})
    assert abs(float(t_cells.mean()) - np.log(1000)) < 0.02 and abs(float(t_cells.std()) - 0.1) < 0.01
    assert abs(float(b_cells.mean()) - np.log(8000)) < 0.03 and abs(float(b_cells.std()) - 0.3) < 0.02
    # B/stim was never seen: fall back to all cells (a 50/50 mixture of both modes)
    unseen = log_sizes({"cell_type": "B", "condition": "stim"})
    assert abs(float(unseen.mean()) - np.log(np.sqrt(1000 * 8000))) < 0.05 and float(unseen.std()) > 0.9
    everything = conditioner.sample_library_size(None, 4000, generator).log()
    assert abs(float(everything.mean()) - float(unseen.mean())) < 0.1


def test_conditioner_round_trip_and_new_labels(conditioner, tmp_path):
    conditioner.add_labels("cell_type", ["NK"])
    conditioner.add_covariate("donor", ["d1", "d2"])
    conditioner.save_pretrained(tmp_path)
    reloaded = CellConditioner.from_pretrained(tmp_path)
    assert reloaded.config.covariate_labels == {
        "cell_type": ["T", "B", "NK"], "condition": ["ctrl", "stim"], "donor": ["d1", "d2"]
    }
    assert reloaded.num_labels == {"cell_type": 3, "condition": 2, "donor": 2}
    for name in ("group_label_ids", "group_num_cells", "group_log_mean", "group_log_var"):
        assert torch.equal(getattr(reloaded, name), getattr(conditioner, name))
    labels = reloaded.encode({"cell_type": ["T", "NK"], "donor": ["d2", "d1"]})
    assert labels["cell_type"].tolist() == [0, 2]
    draws = reloaded.sample_library_size(reloaded.encode({"cell_type": "T", "donor": "d2"}, num_cells=2000), 2000)
    assert abs(float(draws.log().mean()) - np.log(1000)) < 0.02  # donor added after the fit matches any group
    with pytest.raises(ConditionError, match="already known"):
        reloaded.add_labels("cell_type", ["T"])
