"""Flow-matching (rectified flow) training objective of the latent DiT, in the diffusers / SD3 convention.

For clean latents `x` and Gaussian noise `n`, a noise level `sigma` in [0, 1] gives

    x_sigma  = (1 - sigma) * x + sigma * n        (sigma = 1 is pure noise)
    target   = n - x                              (the velocity; d x_sigma / d sigma)
    timestep = sigma * num_train_timesteps        (what the transformer receives; 1000 by default)

which is exactly `FlowMatchEulerDiscreteScheduler.scale_noise` with `shift=1`, except that sigma is continuous here
instead of lying on the scheduler's 1000-step training grid. Classifier-free guidance is learned by replacing
covariate labels with the null label (id `num_labels`) with probability `condition_dropout`.

`coupling` chooses which noise `n` each latent `x` of a batch is paired with: `"independent"` draws (the released
scLDM and scLDM.CD4), or the exact minibatch optimal-transport plan (Tong et al. 2023, OT-CFM) on squared Euclidean
distances, which pairs each latent with a nearby noise sample and straightens the paths the sampler integrates. The
noise is permuted, never the latents, so each cell keeps its labels; `"minibatch_ot_by_label"` solves the plan within
each group of cells with the same labels, so the noise paired with a label stays a standard normal sample.
"""

import typing
from typing import Literal

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from diffusers.training_utils import compute_density_for_timestep_sampling
from diffusers.utils.torch_utils import randn_tensor

from scldm_hf.errors import ConditionError, ConfigurationError, check_choice
from scldm_hf.models.transformer_latent_dit import LatentDiTTransformer

TimestepSampling = Literal["uniform", "logit_normal"]
DropoutMode = Literal["joint", "independent"]
Coupling = Literal["independent", "minibatch_ot", "minibatch_ot_by_label"]
COUPLINGS = typing.get_args(Coupling)


def sample_sigmas(
    batch_size: int,
    timestep_sampling: TimestepSampling = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Noise levels `[B]` in [0, 1]: uniform, or logit-normal (`sigmoid(N(logit_mean, logit_std))`, SD3)."""
    check_choice("timestep_sampling", timestep_sampling, TimestepSampling)
    sigmas = compute_density_for_timestep_sampling(
        timestep_sampling,
        batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        device=generator.device if generator is not None else "cpu",
        generator=generator,
    )
    return sigmas.to(device)


def add_noise(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """`x_sigma = (1 - sigma) * latents + sigma * noise` for `latents, noise [B, ...]` and `sigmas [B]`."""
    sigmas = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1 - sigmas) * latents + sigmas * noise


def drop_covariates(
    covariates: dict[str, torch.LongTensor],
    num_labels: dict[str, int],
    probability: float,
    mode: DropoutMode = "joint",
    generator: torch.Generator | None = None,
) -> dict[str, torch.LongTensor]:
    """Replace label ids `[B]` by the null id `num_labels[name]` with `probability`.

    `mode="joint"` drops all covariates of a cell together (the model learns `v(x | all)` and `v(x | none)`);
    `"independent"` drops each covariate separately (it also learns `v(x | covariate k only)`, which per-covariate
    guidance uses).
    """
    if not 0 <= probability <= 1:
        raise ConfigurationError(f"condition_dropout={probability} must be in [0, 1].")
    check_choice("condition dropout mode", mode, DropoutMode)
    unknown = sorted(set(covariates) - set(num_labels))
    if unknown:
        raise ConditionError(f"Covariates {unknown} are unknown to the model; its covariates are {sorted(num_labels)}.")
    if not covariates or probability == 0:
        return dict(covariates)
    batch_size = next(iter(covariates.values())).shape[0]
    rand_device = generator.device if generator is not None else "cpu"
    num_draws = 1 if mode == "joint" else len(covariates)
    dropped = torch.rand(num_draws, batch_size, generator=generator, device=rand_device) < probability
    dropped = dropped.expand(len(covariates), batch_size)
    return {
        name: torch.where(drop.to(ids.device), torch.full_like(ids, num_labels[name]), ids)
        for drop, (name, ids) in zip(dropped, covariates.items())
    }


def optimal_transport_pairing(
    latents: torch.Tensor, noise: torch.Tensor, groups: torch.LongTensor | None = None
) -> torch.LongTensor:
    """The noise row paired with each latent `[B]` under the exact OT plan between `latents` and `noise [B, ...]`.

    The cost is the squared Euclidean distance between flattened rows; the plan (a permutation, uniform weights) is
    scipy's `linear_sum_assignment`. With `groups [B]` (integer ids), each group is paired within itself.
    """
    cost = torch.cdist(latents.flatten(1).double(), noise.flatten(1).double()).square().cpu()
    groups = torch.zeros(len(latents), dtype=torch.long) if groups is None else groups.cpu()
    pairing = torch.arange(len(latents))
    for group in groups.unique():
        members = (groups == group).nonzero().squeeze(1)
        _, columns = linear_sum_assignment(cost[members][:, members].numpy())
        pairing[members] = members[columns]
    return pairing.to(latents.device)


def couple_noise(
    latents: torch.Tensor, noise: torch.Tensor, coupling: Coupling, covariates: dict[str, torch.LongTensor]
) -> torch.Tensor:
    """`noise [B, ...]` reordered to pair with `latents [B, ...]` by `coupling` (see the module docstring).

    `covariates` (label ids `{name: [B]}`, before any dropout) define the groups of `"minibatch_ot_by_label"`.
    """
    check_choice("coupling", coupling, Coupling)
    if coupling == "independent":
        return noise
    groups = None
    if coupling == "minibatch_ot_by_label" and covariates:
        labels = torch.stack(list(covariates.values()), dim=1)
        groups = labels.unique(dim=0, return_inverse=True)[1]
    return noise[optimal_transport_pairing(latents, noise, groups)]


def flow_matching_loss(
    transformer: LatentDiTTransformer,
    latents: torch.Tensor,
    covariates: dict[str, torch.LongTensor] | None = None,
    timestep_sampling: TimestepSampling = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    condition_dropout: float = 0.1,
    dropout_mode: DropoutMode = "joint",
    num_train_timesteps: int = 1000,
    coupling: Coupling = "independent",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean squared error between the predicted and the true velocity for clean `latents [B, T, D]` (scalar).

    `covariates` are label ids `{name: LongTensor [B]}`; they are dropped to null for classifier-free guidance as in
    [`drop_covariates`], after the noise is paired with the latents by `coupling` ([`couple_noise`]). Pass a
    `generator` for reproducible noise, noise levels and dropout.
    """
    batch_size = latents.shape[0]
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    noise = couple_noise(latents, noise, coupling, covariates or {})
    sigmas = sample_sigmas(batch_size, timestep_sampling, logit_mean, logit_std, generator, latents.device)
    covariates = drop_covariates(
        covariates or {}, transformer.config.covariate_num_labels, condition_dropout, dropout_mode, generator
    )
    prediction = transformer(
        add_noise(latents, noise, sigmas), timestep=sigmas * num_train_timesteps, covariates=covariates
    ).sample
    return F.mse_loss(prediction.float(), (noise - latents).float())


__all__ = ["add_noise", "couple_noise", "drop_covariates", "flow_matching_loss", "optimal_transport_pairing",
           "sample_sigmas"]
