"""Helpers of the parity tests with the authors' released code (../shared/reference): import its packages, build its
networks from a Hydra model config with random weights, and save them as its Lightning module does."""

import sys
import types
from pathlib import Path

import pytest
import torch

from scldm_hf.conversion.convert_original import load_original_config

REFERENCE_DIR = (Path(__file__).resolve().parents[1] / ".." / "shared" / "reference").resolve()


def import_reference(package: str, source_dir: Path, submodules: list[str]) -> types.SimpleNamespace:
    """The reference package's `submodules` (its `__init__` may need the package installed, so it is not run)."""
    if not source_dir.is_dir():
        pytest.skip(f"reference code {source_dir} is absent")
    if package not in sys.modules:
        namespace = types.ModuleType(package)
        namespace.__path__ = [str(source_dir / package)]
        sys.modules[package] = namespace
    import importlib

    modules = {name: importlib.import_module(f"{package}.{name}") for name in submodules}
    return types.SimpleNamespace(**{name.rsplit(".", 1)[-1]: module for name, module in modules.items()})


def _kwargs(node: dict) -> dict:
    """Constructor arguments of a Hydra node (without `_target_`, `_partial_`, ...)."""
    return {key: value for key, value in node.items() if not key.startswith("_")}


def build_reference(reference, config_path: Path):
    """Reference `(input_layer, encoder, decoder, head, dit)` from a released-style config, with random weights. The
    DiT is CD4's `FlowMatching(nnet=DiT)` when the config's `diffusion_model` has an `nnet`."""
    model = load_original_config(config_path)
    vae = model["module"]["vae_model"]
    input_layer = reference.layers.InputTransformerVAE(**_kwargs(vae["input_layer"]))
    encoder = reference.nnets.Encoder(**_kwargs(vae["encoder"]))
    decoder = reference.nnets.Decoder(**_kwargs(vae["decoder"]))
    head = reference.stochastic_layers.NegativeBinomialTransformerLayer(**_kwargs(vae["decoder_head"]))
    diffusion = model["module"]["diffusion_model"]
    if "nnet" in diffusion:
        nnet = reference.nnets.DiT(**_kwargs(diffusion["nnet"]))
        dit = reference.diffusion.FlowMatching(nnet=nnet, **_kwargs({k: v for k, v in diffusion.items() if k != "nnet"}))
    else:
        dit = reference.nnets.DiT(**_kwargs(diffusion))
    generator = torch.Generator().manual_seed(0)
    modules = (input_layer, encoder, decoder, head, dit)
    with torch.no_grad():
        for module in modules:
            for name, parameter in module.named_parameters():
                if "pos_embed" not in name:
                    scale = 0.1 if module is dit else 0.3  # keeps the DiT velocity O(1), so float32 can resolve 1e-5
                    parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    # the reference's timestep embedding casts to float32, so its DiT runs in float32
    return [module.double().eval() for module in modules[:-1]] + [dit.eval()]


def save_lightning_checkpoint(path: Path, input_layer, encoder, decoder, head, dit, ema_dit=None) -> None:
    """Save as the reference's `LatentDiffusion` does: `vae_model.*`, `diffusion_model.*`, `ema_model.*`
    (ema_pytorch)."""
    state_dict = {}
    for prefix, module in (("input_layer", input_layer), ("encoder", encoder), ("decoder", decoder),
                           ("decoder_head", head)):
        state_dict |= {f"vae_model.{prefix}.{key}": value for key, value in module.state_dict().items()}
    state_dict |= {f"diffusion_model.{key}": value for key, value in dit.state_dict().items()}
    if ema_dit is not None:
        state_dict |= {f"ema_model.ema_model.{key}": value for key, value in ema_dit.state_dict().items()}
        state_dict |= {"ema_model.initted": torch.tensor(True), "ema_model.step": torch.tensor(100)}
    torch.save({"state_dict": state_dict, "epoch": 3, "global_step": 100, "pytorch-lightning_version": "2.5.0"}, path)


def reference_ode_sample(reference, guided_velocity, noise, condition, atol: float, rtol: float) -> torch.Tensor:
    """The reference's dopri5 sample (`transport.integrators.ode` over t = 0 noise -> 1 data, 50 reported times) from
    `noise`, with `guided_velocity(x, t, condition=...)` (e.g. a `forward_with_cfg`)."""
    ode = reference.integrators.ode(lambda x, t, model, **kwargs: model(x, t, **kwargs), t0=0.0, t1=1.0,
                                    sampler_type="dopri5", num_steps=50, atol=atol, rtol=rtol)
    with torch.no_grad():
        return ode.sample(noise, guided_velocity, condition=condition)[-1]


def pipeline_latents(pipe, labels: dict[str, torch.Tensor], guidance_scale, seed: int) -> torch.Tensor:
    """Latents `[B, T, D]` the converted pipeline samples for label ids `{name: [B]}` (label names are the ids, as
    converted without --anndata), reporting the same 50 times as `reference_ode_sample`."""
    return pipe(
        conditions={name: [str(label) for label in ids.tolist()] for name, ids in labels.items()},
        guidance_scale=guidance_scale,
        num_inference_steps=49,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    ).cells
