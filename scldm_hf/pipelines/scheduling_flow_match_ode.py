"""`FlowMatchODESolverScheduler`: adaptive ODE integration (torchdiffeq, dopri5 by default) of a flow-matching model.

The released scLDM samples with `torchdiffeq.odeint(method="dopri5", atol=rtol=1e-5)` over data time t = 1 - sigma
from 0 (noise) to 1 (data). An adaptive solver has no fixed step list, so this scheduler does not `step`: a pipeline
hands it the velocity function and it integrates the whole path with `integrate`.
"""

from collections.abc import Callable

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin


class FlowMatchODESolverScheduler(SchedulerMixin, ConfigMixin):
    r"""Integrates `dx/dsigma = v(x, sigma * num_train_timesteps)` from sigma = 1 to 0 with a torchdiffeq solver.

    Args:
        method (`str`, defaults to `"dopri5"`): torchdiffeq solver (`"dopri5"`, `"dopri8"`, `"bosh3"`, `"euler"`...).
        atol (`float`, defaults to 1e-5): Absolute error tolerance of adaptive solvers.
        rtol (`float`, defaults to 1e-5): Relative error tolerance of adaptive solvers.
        num_train_timesteps (`int`, defaults to 1000): `timestep = sigma * num_train_timesteps`, as the model expects.
    """

    order = 1

    @register_to_config
    def __init__(self, method: str = "dopri5", atol: float = 1e-5, rtol: float = 1e-5, num_train_timesteps: int = 1000):
        self.set_timesteps(1)

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Report the solution at `num_inference_steps + 1` evenly spaced sigmas from 1 to 0 (adaptive solvers choose
        their own steps between them; fixed-step solvers take one step per interval)."""
        self.sigmas = torch.linspace(1.0, 0.0, num_inference_steps + 1, device=device)
        self.timesteps = self.sigmas[:-1] * self.config.num_train_timesteps

    def integrate(self, velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor):
        """Clean samples `[B, ...]` from `noise [B, ...]`; `velocity(x [B, ...], timestep)` (a scalar tensor) -> `dx/dsigma`.

        The integration runs forward in data time t = 1 - sigma, as the released scLDM's sampler does.
        """
        from torchdiffeq import odeint

        num_train_timesteps = self.config.num_train_timesteps

        def drift(data_time: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
            return -velocity(latents, (1 - data_time) * num_train_timesteps)

        data_times = (1 - self.sigmas).to(device=noise.device, dtype=noise.dtype)
        path = odeint(drift, noise, data_times, method=self.config.method, atol=self.config.atol, rtol=self.config.rtol)
        return path[-1]


__all__ = ["FlowMatchODESolverScheduler"]
