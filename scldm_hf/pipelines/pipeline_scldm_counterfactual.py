"""`SCLDMCounterfactualPipeline`: edit real cells into another condition (counterfactual perturbation prediction).

Like an img2img pipeline: each real cell is encoded by the VAE, its latent is edited from its own (source) labels to
the target labels by one of three flow-matching edits (`edit_method`), decoded, and drawn as counts. The result is
paired cell by cell with the input.

- ``"inversion"``: carry the latent to noise by integrating the probability-flow ODE *backwards* (sigma 0 -> 1)
  under the source labels, then forwards (sigma 1 -> 0) under the target labels. The noise keeps what the source
  labels do not explain (the cell's state within its group); the target labels add the perturbation.
- ``"difference"``: the same inversion, then the cell's latent plus the difference of the forward trajectories from
  that noise under the target and under the source labels. The Euler round-trip error (inversion then forward under
  the same labels does not quite return the cell) is common to both and cancels: only the change of labels moves
  the cell.
- ``"flowedit"``: FlowEdit (Kulikov et al. 2024, arXiv:2412.08629), inversion-free: at each sigma the cell is noised
  with fresh noise, the edited latent is noised with the same noise, and the edit integrates the difference of
  their velocities under the target and the source labels. Stochastic (the noise comes from `generator`).
"""

from typing import Literal, get_args

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from diffusers.utils.torch_utils import randn_tensor

from ..data import anndata_to_dataset, encode_dataset
from ..errors import check_choice
from ..validation import check_conditions, check_guidance_scale

from .pipeline_scldm import OutputType, SCLDMPipeline, SCLDMPipelineOutput

EditMethod = Literal["inversion", "difference", "flowedit"]
EDIT_METHODS = get_args(EditMethod)


class SCLDMCounterfactualPipeline(SCLDMPipeline):
    r"""Counterfactual editing of real cells with a trained scLDM (same modules as [`SCLDMPipeline`]).

    Assumptions:
        - The input cells are raw integer counts; genes outside the VAE vocabulary are dropped, vocab genes absent
          from the input are treated as unmeasured (as in training).
        - The source labels of every covariate of the model are read from `cells.obs` (a covariate missing there is
          left unconditioned during inversion); the target labels default to the source ones, so only the covariates
          given in `target_conditions` change.
        - Inversion uses the plain conditional velocity (`source_guidance_scale=1`); guidance > 1 during inversion
          makes the Euler inversion less exact. The round trip (same labels, guidance 1) only approximately
          reconstructs a cell with `edit_method="inversion"` (the Euler discretisation error shrinks with
          `num_inference_steps`); with `"difference"` (and `"flowedit"` at equal guidance scales) unchanged labels
          return the cell's own latent exactly.
        - Library sizes: every edited cell keeps its input's total counts over the vocab genes the input measures
          (sequencing depth is a property of the measurement, not of the perturbation): the decoded means are scaled
          so that those genes sum to the input's total; vocab genes the input lacks are imputed on the same scale, so
          with a partial panel the output's total over all genes exceeds the input's. Counts are negative binomial
          draws at those means.
    """

    def invert(
        self,
        latents: torch.Tensor,
        covariates: dict[str, torch.LongTensor],
        guidance_scale: float | dict[str, float] = 1.0,
        num_inference_steps: int = 25,
    ) -> torch.Tensor:
        """Carry clean latents `[B, T, D]` to noise `[B, T, D]`: Euler steps from sigma 0 to 1 on the scheduler's
        sigmas reversed, `x <- x + (sigma_next - sigma) * v(x, sigma | covariates)`."""
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        sigmas = self.scheduler.sigmas.flip(0).to(latents.device)
        timesteps = sigmas * self.scheduler.config.num_train_timesteps
        for sigma, sigma_next, timestep in zip(sigmas[:-1], sigmas[1:], timesteps[:-1]):
            velocity = self.predict_velocity(latents, timestep, covariates, guidance_scale)
            latents = latents + (sigma_next - sigma) * velocity
        return latents

    def flowedit(
        self,
        latents: torch.Tensor,
        source_covariates: dict[str, torch.LongTensor],
        target_covariates: dict[str, torch.LongTensor],
        guidance_scale: float | dict[str, float],
        source_guidance_scale: float | dict[str, float],
        num_inference_steps: int,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """FlowEdit of clean latents `[B, T, D]`: for each sigma of the schedule (1 -> 0), noise `n`,
        `z_src = (1 - sigma) x + sigma n`, `z_tgt = z_src + edited - x`, and
        `edited <- edited + (sigma_next - sigma) (v(z_tgt | target) - v(z_src | source))`."""
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        sigmas = self.scheduler.sigmas.to(latents.device)
        edited = latents
        for sigma, sigma_next, timestep in zip(sigmas[:-1], sigmas[1:], self.scheduler.timesteps):
            noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
            noisy_source = (1 - sigma) * latents + sigma * noise
            noisy_target = noisy_source + edited - latents
            velocity_change = self.predict_velocity(
                noisy_target, timestep, target_covariates, guidance_scale
            ) - self.predict_velocity(noisy_source, timestep, source_covariates, source_guidance_scale)
            edited = edited + (sigma_next - sigma) * velocity_change
        return edited

    def cell_labels(self, obs: pd.DataFrame, target_conditions: dict[str, list[str] | str] | pd.DataFrame | None):
        """Source labels (the model's covariates found in `obs`) and target labels (source, overridden by
        `target_conditions`; a single label applies to every cell), as DataFrames of str with `obs`'s index."""
        known = self.conditioner.covariate_names
        source = obs[[name for name in known if name in obs.columns]].astype(str)
        target = source.copy()
        if target_conditions is not None:
            overrides = check_conditions(target_conditions, num_cells=len(obs))
            for name in overrides.columns:
                target[name] = overrides[name].to_numpy()
        return source, target

    @torch.no_grad()
    def __call__(
        self,
        cells: ad.AnnData,
        target_conditions: dict[str, list[str] | str] | pd.DataFrame | None = None,
        guidance_scale: float | dict[str, float] = 1.0,
        source_guidance_scale: float | dict[str, float] = 1.0,
        edit_method: EditMethod = "inversion",
        num_inference_steps: int = 25,
        generator: torch.Generator | None = None,
        batch_size: int = 1024,
        output_type: OutputType = "anndata",
        return_dict: bool = True,
        layer: str | None = None,
    ) -> SCLDMPipelineOutput | tuple:
        r"""Edit `cells` into `target_conditions`.

        Args:
            cells (`anndata.AnnData`): Real cells (integer counts, `[N, genes]`, in `X` or in `layers[layer]`); `obs`
                holds their source labels.
            target_conditions (`dict` or `pandas.DataFrame`, *optional*): Labels to change, e.g.
                `{"condition": "stimulated"}` (one label for all cells) or one label per cell. Covariates left out
                keep the cell's own label. `None` keeps every label (a round trip; see the assumptions above).
            guidance_scale (`float` or `dict[str, float]`, defaults to 1.0): Guidance of the forward (target) passes
                (`"difference"`: both forward passes), as in [`SCLDMPipeline`].
            source_guidance_scale (`float` or `dict[str, float]`, defaults to 1.0): Guidance of the inversion
                (`"flowedit"`: of the source velocity).
            edit_method (`"inversion"`, `"difference"` or `"flowedit"`, defaults to `"inversion"`): How latents are
                edited (module docstring).
            num_inference_steps (`int`, defaults to 25): Euler steps of each direction.
            generator (`torch.Generator`, *optional*): Makes the count draws (and FlowEdit's noise) reproducible;
                the rest is deterministic.
            batch_size (`int`, defaults to 1024): Cells edited at once.
            output_type (`"anndata"`, `"counts"` or `"latent"`): AnnData paired with the input (same cells, same
                order, `obs` copied with the target labels written over the source ones and the source labels kept
                as `source_<covariate>` where they changed), the CSR counts `[N, G]`, or the edited latents `[N, T, D]`.
            return_dict (`bool`, defaults to True): Return a [`SCLDMPipelineOutput`] instead of a tuple.
            layer (`str`, *optional*): The layer of `cells` holding the raw counts (None: `X`).
        """
        self.check_inputs(num_inference_steps, batch_size, output_type)
        check_choice("edit_method", edit_method, EditMethod)
        source, target = self.cell_labels(cells.obs, target_conditions)
        source_ids, target_ids = self.conditioner.encode(source), self.conditioner.encode(target)
        check_guidance_scale(source_guidance_scale, list(source_ids))
        check_guidance_scale(guidance_scale, list(target_ids))
        dataset, info = anndata_to_dataset(cells, vocab=self.vae.gene_vocab, layer=layer)
        measured_columns = torch.as_tensor(info.measured_gene_ids, device=self._execution_device) - 1
        device = self._execution_device
        vae_latents = torch.from_numpy(encode_dataset(self.vae, dataset, batch_size=batch_size)).to(device)
        clean_latents = self.vae.normalize_latents(vae_latents)
        library_size = torch.as_tensor(np.asarray(dataset["library_size"]), dtype=torch.float32, device=device)

        outputs = []
        for start in self.progress_bar(range(0, len(cells), batch_size)):
            batch = slice(start, start + batch_size)
            cell_latents = clean_latents[batch].to(self.transformer.dtype)
            source_covariates = {name: ids[batch].to(device) for name, ids in source_ids.items()}
            target_covariates = {name: ids[batch].to(device) for name, ids in target_ids.items()}
            if edit_method == "flowedit":
                latents = self.flowedit(cell_latents, source_covariates, target_covariates, guidance_scale,
                                        source_guidance_scale, num_inference_steps, generator)
            else:
                noise = self.invert(cell_latents, source_covariates, source_guidance_scale, num_inference_steps)
                latents = self.denoise(noise, target_covariates, guidance_scale, num_inference_steps)
                if edit_method == "difference":
                    source_latents = self.denoise(noise, source_covariates, guidance_scale, num_inference_steps)
                    latents = cell_latents + latents - source_latents
            latents = self.vae.denormalize_latents(latents)
            if output_type == "latent":
                outputs.append(latents)
                continue
            outputs.append(self.decode_counts(latents, library_size[batch], generator, library_genes=measured_columns))
        self.maybe_free_model_hooks()

        if output_type == "latent":
            edited = torch.cat(outputs)
        else:
            edited = sp.vstack(outputs, format="csr")
            if output_type == "anndata":
                provenance = self.provenance(generator, guidance_scale, num_inference_steps, edit_method=edit_method,
                                             source_guidance_scale=source_guidance_scale, layer=layer)
                edited = ad.AnnData(
                    X=edited,
                    obs=self.edited_obs(cells.obs, source, target),
                    var=pd.DataFrame(index=pd.Index(self.vae.config.gene_names, name="gene")),
                    uns={"scldm_hf": provenance},
                )
        if not return_dict:
            return (edited,)
        return SCLDMPipelineOutput(cells=edited)

    @staticmethod
    def edited_obs(obs: pd.DataFrame, source: pd.DataFrame, target: pd.DataFrame) -> pd.DataFrame:
        """`obs` with the target labels written over the source ones; changed covariates keep `source_<name>`."""
        edited = obs.copy()
        for name in target.columns:
            if name in source.columns and not source[name].equals(target[name]):
                edited[f"source_{name}"] = pd.Categorical(source[name])
            edited[name] = pd.Categorical(target[name])
        return edited


__all__ = ["SCLDMCounterfactualPipeline"]
