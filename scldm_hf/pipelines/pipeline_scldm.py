"""`SCLDMPipeline`: generate single cells (integer counts) from covariate labels with a latent flow-matching DiT.

Sampling integrates the probability-flow ODE of the latent DiT from noise (sigma = 1) to data (sigma = 0) with a
diffusers flow-matching scheduler, decodes the latents with the VAE at library sizes drawn from the conditioner's
log-normal model, and draws negative binomial counts.
"""

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Literal, NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import diffusers
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download

from ..errors import ConfigurationError, check_choice
from ..hub_code import write_class_code
from ..models.conditioning import CellConditioner
from ..models.modeling_scvae import SCVAEModel
from ..models.transformer_latent_dit import LatentDiTTransformer
from ..validation import check_conditions, check_fits_in_memory, check_guidance_scale, check_num_cells
from ..version import package_version

from .scheduling_flow_match_ode import FlowMatchODESolverScheduler

OutputType = Literal["anndata", "counts", "latent"]
DECODE_GENE_TOKENS = 2**14  # cells x genes decoded at once (see `SCLDMPipeline.decode_counts`)
HUB_CACHE_PREFIX = "models--"  # huggingface_hub caches repo `a/b` as `models--a--b/snapshots/<commit>`


class GeneratedBatch(NamedTuple):
    """One batch of `SCLDMPipeline.generate_batches`: cell names `[b]`, counts (CSR int32 `[b, G]`; None for
    `output_type="latent"`), the label ids `{covariate: [b]}` of the conditioned covariates (ids into the
    conditioner's labels) and the VAE latents `[b, T, D]` the counts were drawn from."""

    cell_ids: list[str]
    counts: sp.csr_matrix | None
    label_ids: dict[str, np.ndarray]
    latents: torch.Tensor


@dataclass
class SCLDMPipelineOutput(BaseOutput):
    """Output of [`SCLDMPipeline`].

    Args:
        cells (`anndata.AnnData`, `scipy.sparse.csr_matrix` or `torch.Tensor`):
            `output_type="anndata"`: AnnData of integer counts (CSR `[N, G]`), `obs` = the conditions, `var_names` =
            the VAE's genes. `"counts"`: the CSR count matrix `[N, G]`. `"latent"`: the latents `[N, T, D]`.
    """

    cells: ad.AnnData | sp.csr_matrix | torch.Tensor


class SCLDMPipeline(DiffusionPipeline):
    r"""Conditional single-cell generation with scLDM.

    Args:
        vae ([`SCVAEModel`]): Decodes latents `[B, T, D]` into negative binomial parameters over the vocabulary.
        transformer ([`LatentDiTTransformer`]): Predicts the velocity `noise - latents`.
        scheduler ([`FlowMatchEulerDiscreteScheduler`], [`FlowMatchHeunDiscreteScheduler`] or
            [`FlowMatchODESolverScheduler`]):
            Integrates the ODE from sigma = 1 (noise) to 0 (data). In the installed diffusers, `set_timesteps(n)` gives
            `n` sigmas evenly spaced from 1 to 1/1000 (`shift=1` leaves them unchanged; `shift > 1` moves steps towards
            noise), followed by a final 0; `step` does `x + (sigma_next - sigma) * velocity`. Heun adds a corrector
            evaluation per step except the last (`2n - 1` transformer calls for `n` steps).
            `FlowMatchODESolverScheduler` integrates adaptively (dopri5, as the released scLDM samples).
        conditioner ([`CellConditioner`]): Label vocabularies and the library-size model.
    """

    model_cpu_offload_seq = "transformer->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vae: SCVAEModel,
        transformer: LatentDiTTransformer,
        scheduler: FlowMatchEulerDiscreteScheduler | FlowMatchHeunDiscreteScheduler | FlowMatchODESolverScheduler,
        conditioner: CellConditioner,
    ):
        super().__init__()
        self.register_modules(vae=vae, transformer=transformer, scheduler=scheduler, conditioner=conditioner)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | PathLike, **kwargs) -> "SCLDMPipeline":
        """Load a folder written by `save_pretrained`, or a Hub repo id, with this class and this package's models.

        `model_index.json` names the code shipped in the folder (see `save_pretrained`), which
        `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` imports; here the installed classes load the
        weights instead, so no remote code runs. `revision`, `cache_dir`, `local_files_only` and `token` select the
        Hub snapshot (`huggingface_hub.snapshot_download`), `torch_dtype` is passed to the models, and components
        given by name (e.g. `scheduler=...`) are used as given.
        """
        hub_options = {name: kwargs.pop(name) for name in ("revision", "cache_dir", "local_files_only", "token")
                       if name in kwargs}
        model_options = {"torch_dtype": kwargs.pop("torch_dtype")} if "torch_dtype" in kwargs else {}
        component_names, _ = cls._get_signature_keys(cls)
        unknown = sorted(set(kwargs) - set(component_names))
        if unknown:
            raise ConfigurationError(
                f"{cls.__name__}.from_pretrained got unsupported arguments {unknown}; it takes the components "
                f"{sorted(component_names)}, torch_dtype, and the Hub options {sorted(hub_options) or 'revision'}."
            )
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            folder = Path(snapshot_download(str(pretrained_model_name_or_path), **hub_options))
        index = json.loads((folder / cls.config_name).read_text())
        model_classes = {"vae": SCVAEModel, "transformer": LatentDiTTransformer, "conditioner": CellConditioner}
        for name in sorted(set(component_names) - set(kwargs)):
            if name in model_classes:
                kwargs[name] = model_classes[name].from_pretrained(folder / name, **model_options)
            else:
                class_name = index[name][1]
                component_class = FlowMatchODESolverScheduler if class_name == FlowMatchODESolverScheduler.__name__ \
                    else getattr(diffusers, class_name)
                kwargs[name] = component_class.from_pretrained(folder, subfolder=name)
        pipeline = cls(**kwargs)
        pipeline.register_to_config(_name_or_path=str(folder))
        return pipeline

    def save_pretrained(self, save_directory: str | PathLike, **kwargs) -> None:
        """`DiffusionPipeline.save_pretrained`, plus the code of the pipeline (at the root) and of each scLDM model (in
        its folder), named in `model_index.json` as diffusers expects custom code: the folder, or a Hub repo uploaded
        from it, loads with `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` where scldm_hf is not
        installed. The root names `SCLDMPipeline` (subclasses load the same folder with their `from_pretrained`)."""
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        index = json.loads((folder / self.config_name).read_text())
        index["_class_name"] = write_class_code(SCLDMPipeline, folder).split(".")
        shipped = ("vae", "transformer", "conditioner")
        if isinstance(self.scheduler, FlowMatchODESolverScheduler):
            shipped += ("scheduler",)
        for name in shipped:
            index[name] = write_class_code(type(getattr(self, name)), folder / name).split(".")
        (folder / self.config_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def add_condition_labels(self, covariate: str, labels: list[str]) -> None:
        """Add new labels to a covariate (for fine-tuning); existing label embeddings stay bit-identical."""
        self.conditioner.add_labels(covariate, labels)
        self.transformer.add_covariate_labels(covariate, len(labels))

    def add_condition(self, covariate: str, labels: list[str]) -> None:
        """Add a new covariate (for fine-tuning); the model's predictions are unchanged until it is trained."""
        self.conditioner.add_covariate(covariate, labels)
        self.transformer.add_covariate(covariate, len(labels))

    def check_inputs(
        self,
        num_inference_steps: int,
        batch_size: int,
        output_type: str,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        callback_on_step_end: Callable | None = None,
    ) -> None:
        for name, value in (("num_inference_steps", num_inference_steps), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigurationError(f"{name}={value!r} must be a positive integer.")
        check_choice("output_type", output_type, OutputType)
        tensor_inputs = callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        unknown_inputs = sorted(set(tensor_inputs) - set(self._callback_tensor_inputs))
        if unknown_inputs:
            raise ConfigurationError(
                f"callback_on_step_end_tensor_inputs {unknown_inputs} are not among {self._callback_tensor_inputs}."
            )
        if callback_on_step_end is not None and isinstance(self.scheduler, FlowMatchODESolverScheduler):
            raise ConfigurationError(
                "callback_on_step_end needs a stepping scheduler; FlowMatchODESolverScheduler integrates adaptively "
                "without steps: use FlowMatchEulerDiscreteScheduler or FlowMatchHeunDiscreteScheduler."
            )
        if self.conditioner.num_labels != self.transformer.config.covariate_num_labels:
            raise ConfigurationError(
                f"The conditioner's labels per covariate {self.conditioner.num_labels} do not match the transformer's "
                f"{self.transformer.config.covariate_num_labels}; add labels with `pipe.add_condition_labels`."
            )

    def prepare_latents(
        self,
        num_cells: int,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Initial noise `[num_cells, T, D]`: `latents` as given (shape-checked), or drawn with `generator` (refused
        when it cannot fit in the device's memory)."""
        config = self.transformer.config
        shape = (num_cells, config.num_latent_tokens, config.latent_dim)
        device = self._execution_device
        if latents is None:
            check_fits_in_memory(
                math.prod(shape) * self.transformer.dtype.itemsize, device, f"the initial noise of {num_cells} cells",
                "`pipe(...)` holds every cell in memory: stream them to a file with "
                "`scldm_hf.pipelines.streaming.generate_to_file(pipe, 'cells.h5ad', ...)` (or `scldm generate`), or "
                "iterate `pipe.generate_batches(...)`, which draw the noise one batch at a time.",
            )
            return randn_tensor(shape, generator=generator, device=device, dtype=self.transformer.dtype)
        if tuple(latents.shape) != shape:
            raise ConfigurationError(
                f"latents have shape {tuple(latents.shape)} but {num_cells} cells need initial noise of shape "
                f"{list(shape)} [cells, num_latent_tokens, latent_dim]; pass one noise tensor per cell, or leave "
                "latents=None to draw it from `generator`."
            )
        return latents.to(device=device, dtype=self.transformer.dtype)

    def predict_velocity(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        covariates: dict[str, torch.LongTensor],
        guidance_scale: float | dict[str, float],
    ) -> torch.Tensor:
        """Classifier-free guided velocity `[B, T, D]` for `latents [B, T, D]`.

        `v = v_uncond + sum_k w_k (v_k - v_uncond)`, where `v_k` is conditioned on the covariates of term `k`: all
        of them for a float `w`, covariate `k` alone for a dict `{k: w_k}`. Zero-weight terms are skipped, and a
        single term of weight 1 is evaluated alone (no unconditional pass). All passes share one batched forward.
        """
        if isinstance(guidance_scale, Mapping):
            terms = [({name: covariates[name]}, weight) for name, weight in guidance_scale.items()]
        else:
            terms = [(covariates, guidance_scale)] if covariates else []
        terms = [(branch, weight) for branch, weight in terms if weight != 0]
        if len(terms) == 1 and terms[0][1] == 1:
            return self.transformer(latents, timestep, covariates=terms[0][0]).sample

        branches = [{}] + [branch for branch, _ in terms]
        batch_size = len(latents)
        null = self.transformer.null_covariates(batch_size)
        batched_covariates = {
            name: torch.cat([branch.get(name, null_ids) for branch in branches])
            for name, null_ids in null.items()
        }
        velocities = self.transformer(
            latents.repeat(len(branches), 1, 1), timestep, covariates=batched_covariates
        ).sample.chunk(len(branches))
        velocity = velocities[0]
        for (_, weight), conditional_velocity in zip(terms, velocities[1:]):
            velocity = velocity + weight * (conditional_velocity - velocities[0])
        return velocity

    def denoise(
        self,
        noise: torch.Tensor,
        covariates: dict[str, torch.LongTensor],
        guidance_scale: float | dict[str, float] = 1.0,
        num_inference_steps: int = 25,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> torch.Tensor:
        """Integrate noise `[B, T, D]` to standardised clean latents `[B, T, D]` with the scheduler (sigma 1 -> 0).

        The one `scheduler.set_timesteps` call of a pass (a diffusers scheduler counts its steps, so each batch starts
        a fresh schedule). After each step, `callback_on_step_end(self, step, timestep, {"latents": ...})` (a function,
        or diffusers' `PipelineCallback` / `MultiPipelineCallbacks`, whose `tensor_inputs` are passed) may return
        `{"latents": ...}` to replace them, as in diffusers' pipelines.
        """
        self.scheduler.set_timesteps(num_inference_steps, device=noise.device)
        if isinstance(self.scheduler, FlowMatchODESolverScheduler):
            return self.scheduler.integrate(
                lambda latents, timestep: self.predict_velocity(latents, timestep, covariates, guidance_scale), noise
            )
        self.scheduler.set_begin_index(0)
        self._num_timesteps = len(self.scheduler.timesteps)
        tensor_inputs = callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        latents = noise
        for step, timestep in enumerate(self.scheduler.timesteps):
            velocity = self.predict_velocity(latents, timestep, covariates, guidance_scale)
            latents = self.scheduler.step(velocity, timestep, latents).prev_sample
            if callback_on_step_end is not None:
                tensors = {name: latents for name in tensor_inputs}
                latents = callback_on_step_end(self, step, timestep, tensors).pop("latents", latents)
        return latents

    @property
    def num_timesteps(self) -> int:
        """Steps of the current schedule (what diffusers' `PipelineCallback`s read for a `cutoff_step_ratio`)."""
        return self._num_timesteps

    @torch.no_grad()
    def decode_counts(
        self,
        latents: torch.Tensor,
        library_size: torch.Tensor,
        generator: torch.Generator | None = None,
        library_genes: torch.LongTensor | None = None,
    ) -> sp.csr_matrix:
        """Negative binomial counts (CSR int32 `[B, G]`) of `latents [B, T, D]` decoded at `library_size [B]`.

        `library_size` is the expected total over all `G` genes, or with `library_genes` (column indices `[g]`) over
        those genes alone: each cell's decoded means are rescaled so that those genes sum to it, e.g. a partial
        panel's measured genes keep their measured depth and the other genes are imputed on the same scale.

        Decodes `DECODE_GENE_TOKENS // G` cells (at least one) at a time: the decoder's activations are
        `[cells, G, hidden]`, so this bounds memory for any gene panel, and on CPU it keeps each activation small
        enough (~10 MB) for the allocator to reuse instead of mapping and page-faulting fresh memory every call.
        """
        chunk_size = max(1, DECODE_GENE_TOKENS // self.vae.config.vocab_size)
        chunks = []
        for start in range(0, len(latents), chunk_size):
            chunk = slice(start, start + chunk_size)
            decoded = self.vae.decode(latents[chunk].to(self.vae.dtype), library_size=library_size[chunk])
            mean = decoded.mean
            if library_genes is not None:
                mean = mean * (library_size[chunk] / mean[:, library_genes].sum(dim=-1)).unsqueeze(-1)
            counts = self.vae.sample_counts(mean, decoded.inverse_dispersion, generator=generator)
            chunks.append(sp.csr_matrix(counts.cpu().numpy().astype(np.int32)))
        return sp.vstack(chunks, format="csr")

    def sample_counts(
        self, latents: torch.Tensor, covariates: dict[str, torch.LongTensor], generator: torch.Generator | None = None
    ) -> sp.csr_matrix:
        """Counts (CSR int32 `[B, G]`) of VAE latents `[B, T, D]` at library sizes drawn for their label ids `[B]`
        (and, where the conditioner has a latent library-size model, for the latents themselves)."""
        library_size = self.sample_library_size(latents, covariates, generator)
        return self.decode_counts(latents, library_size.to(latents.device), generator)

    def sample_library_size(
        self, latents: torch.Tensor, covariates: dict[str, torch.LongTensor], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Library sizes `[B]` the conditioner draws for VAE latents `[B, T, D]` with label ids `{name: [B]}`."""
        features = self.vae.normalize_latents(latents).flatten(1) if self.conditioner.uses_latents else None
        return self.conditioner.sample_library_size(covariates, len(latents), generator, latent_features=features)

    def provenance(
        self, generator: torch.Generator | None, guidance_scale: float | dict[str, float], num_inference_steps: int,
        **settings,
    ) -> dict:
        """What generated cells record in `uns["scldm_hf"]`: the model (Hub repo id or folder) and its revision (the
        snapshot's commit, for a Hub download), the generator's seed, guidance, steps, scheduler and package
        versions, plus `settings`. Unknown values (no seed, a local folder's revision) are left out."""
        model = self.name_or_path
        revision = None
        snapshot = Path(model) if model else None
        if snapshot is not None and snapshot.parent.name == "snapshots" and snapshot.parent.parent.name.startswith(
                HUB_CACHE_PREFIX):
            model = snapshot.parent.parent.name.removeprefix(HUB_CACHE_PREFIX).replace("--", "/")
            revision = snapshot.name
        record = {
            "pipeline": type(self).__name__,
            "model": model,
            "revision": revision,
            "seed": None if generator is None else generator.initial_seed(),
            "guidance_scale": dict(guidance_scale) if isinstance(guidance_scale, Mapping) else float(guidance_scale),
            "num_inference_steps": int(num_inference_steps),
            "scheduler": type(self.scheduler).__name__,
            "scldm_hf_version": package_version(),
            "diffusers_version": diffusers.__version__,
            **settings,
        }
        return {name: value for name, value in record.items() if value is not None}

    def prepare_conditions(
        self,
        conditions: dict[str, list[str] | str] | pd.DataFrame | None,
        num_cells: int | None,
        guidance_scale: float | dict[str, float],
    ) -> tuple[pd.DataFrame | None, int]:
        """Check the conditions, the number of cells and the guidance -> `(labels, num_cells)`: `labels` is a
        DataFrame of one row per cell, or of a single row for every cell (never repeated `num_cells` times), or
        None (unconditional). Unknown labels raise here, before any work."""
        frame = None
        if conditions is not None:
            frame = check_conditions(conditions)
            if len(frame) > 1:
                frame = check_conditions(frame, num_cells)
            num_cells = len(frame) if num_cells is None else num_cells
            self.conditioner.encode(frame)
        check_num_cells(num_cells)
        check_guidance_scale(guidance_scale, [] if frame is None else list(frame.columns))
        return frame, num_cells

    @torch.no_grad()
    def generate_batches(
        self,
        conditions: dict[str, list[str] | str] | pd.DataFrame | None = None,
        num_cells: int | None = None,
        guidance_scale: float | dict[str, float] = 1.0,
        num_inference_steps: int = 25,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        batch_size: int = 256,
        output_type: Literal["counts", "latent"] = "counts",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> Iterator[GeneratedBatch]:
        """Generate cells one batch at a time, for any number of cells in bounded memory: noise, label ids and counts
        exist for one batch only (a single row of `conditions` is repeated per batch, never `num_cells` times).

        Arguments as in `__call__`; inputs are checked before the first batch. Without `latents`, the noise is drawn
        per batch, before that batch's library sizes and counts, so the cells differ from `__call__`'s for the same
        generator (which draws all the noise first) but are reproducible with it.
        """
        self.check_inputs(num_inference_steps, batch_size, output_type, callback_on_step_end_tensor_inputs,
                          callback_on_step_end)
        labels, num_cells = self.prepare_conditions(conditions, num_cells, guidance_scale)
        if latents is not None:
            latents = self.prepare_latents(num_cells, latents=latents)
        yield from self.generation_loop(
            labels, num_cells, guidance_scale, num_inference_steps, generator, latents, batch_size,
            output_type, callback_on_step_end, callback_on_step_end_tensor_inputs,
        )

    def generation_loop(
        self,
        labels: pd.DataFrame | None,
        num_cells: int,
        guidance_scale: float | dict[str, float],
        num_inference_steps: int,
        generator: torch.Generator | None,
        latents: torch.Tensor | None,
        batch_size: int,
        output_type: Literal["counts", "latent"],
        callback_on_step_end: Callable | None,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> Iterator[GeneratedBatch]:
        """The one generation loop, on checked inputs (`prepare_conditions`): per batch, label ids, noise (a slice
        of `latents [num_cells, T, D]`, or drawn), denoising, and counts (not for `output_type="latent"`)."""
        device = self._execution_device
        with self.progress_bar(total=num_cells) as progress_bar:
            for start in range(0, num_cells, batch_size):
                size = min(batch_size, num_cells - start)
                if labels is None:
                    covariates = {}
                else:
                    rows = labels.iloc[[0] * size] if len(labels) == 1 else labels.iloc[start : start + size]
                    covariates = {name: ids.to(device) for name, ids in self.conditioner.encode(rows).items()}
                noise = self.prepare_latents(size, generator) if latents is None else latents[start : start + size]
                cell_latents = self.vae.denormalize_latents(self.denoise(
                    noise, covariates, guidance_scale, num_inference_steps, callback_on_step_end,
                    callback_on_step_end_tensor_inputs,
                ))
                yield GeneratedBatch(
                    cell_ids=[f"generated_{index}" for index in range(start, start + size)],
                    counts=None if output_type == "latent" else self.sample_counts(cell_latents, covariates, generator),
                    label_ids={name: ids.cpu().numpy() for name, ids in covariates.items()},
                    latents=cell_latents,
                )
                progress_bar.update(size)
        self.maybe_free_model_hooks()

    @torch.no_grad()
    def __call__(
        self,
        conditions: dict[str, list[str]] | pd.DataFrame | None = None,
        num_cells: int | None = None,
        guidance_scale: float | dict[str, float] = 1.0,
        num_inference_steps: int = 25,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        batch_size: int = 256,
        output_type: OutputType = "anndata",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> SCLDMPipelineOutput | tuple:
        r"""Generate cells.

        Args:
            conditions (`dict[str, list[str]]` or `pandas.DataFrame`, *optional*):
                Labels per cell, e.g. `{"cell_type": ["B", "NK"]}`; a single label is repeated `num_cells` times.
                Covariates left out are unconditioned. `None` generates unconditionally (`num_cells` required).
            num_cells (`int`, *optional*): Number of cells; defaults to the number of condition rows.
            guidance_scale (`float` or `dict[str, float]`, defaults to 1.0):
                Classifier-free guidance in [0, 100]: 1 = conditional model, 0 = unconditional, > 1 = stronger
                conditioning. A dict gives one weight per conditioned covariate (`v_uncond + sum_k w_k (v_k - v_uncond)`).
            num_inference_steps (`int`, defaults to 25): ODE steps.
            generator (`torch.Generator`, *optional*): Makes the noise, library sizes and counts reproducible.
            latents (`torch.Tensor` `[N, T, D]`, *optional*): Initial noise (sigma = 1) of the `N` cells, e.g. to
                generate the same cells under other labels; drawn from `generator` (all at once, so the cells do
                not depend on `batch_size`) when not given.
            batch_size (`int`, defaults to 256): Cells integrated at once (larger batches help on GPUs).
            output_type (`"anndata"`, `"counts"` or `"latent"`, defaults to `"anndata"`): See [`SCLDMPipelineOutput`].
            return_dict (`bool`, defaults to True): Return a [`SCLDMPipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): Called
                after every ODE step of every batch as `callback_on_step_end(pipe, step, timestep, callback_kwargs)`;
                `callback_kwargs` holds the tensors named in `callback_on_step_end_tensor_inputs` (a diffusers
                callback object's own `tensor_inputs`; `"latents"`, `[batch, T, D]`), and a returned
                `{"latents": ...}` replaces them. Not with `FlowMatchODESolverScheduler` (no steps).
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): See `callback_on_step_end`.
        """
        self.check_inputs(num_inference_steps, batch_size, output_type, callback_on_step_end_tensor_inputs,
                          callback_on_step_end)
        labels, num_cells = self.prepare_conditions(conditions, num_cells, guidance_scale)
        batches = list(self.generation_loop(
            labels, num_cells, guidance_scale, num_inference_steps, generator,
            self.prepare_latents(num_cells, generator, latents), batch_size,
            "latent" if output_type == "latent" else "counts", callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        ))
        if output_type == "latent":
            cells = torch.cat([batch.latents for batch in batches])
        else:
            cells = sp.vstack([batch.counts for batch in batches], format="csr")
        if output_type == "anndata":
            cells = self.to_anndata(cells, batches, self.provenance(generator, guidance_scale, num_inference_steps))
        if not return_dict:
            return (cells,)
        return SCLDMPipelineOutput(cells=cells)

    def to_anndata(self, counts: sp.csr_matrix, batches: list[GeneratedBatch], uns: dict) -> ad.AnnData:
        """AnnData of generated `counts` `[N, G]`: `obs` = cell names and the labels of `batches` (categorical over
        the conditioner's labels), `var_names` = the VAE's genes, `uns["scldm_hf"]` = `uns`."""
        labels = self.conditioner.config.covariate_labels
        obs = pd.DataFrame(
            {name: pd.Categorical.from_codes(np.concatenate([batch.label_ids[name] for batch in batches]),
                                             categories=list(labels[name]))
             for name in batches[0].label_ids},
            index=pd.Index([cell for batch in batches for cell in batch.cell_ids]),
        )
        return ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=pd.Index(self.vae.config.gene_names, name="gene")),
                          uns={"scldm_hf": uns})


def callback_tensor_inputs(callback: Callable | None, requested: Sequence[str]) -> Sequence[str]:
    """The tensors `callback` gets: a diffusers `PipelineCallback`'s / `MultiPipelineCallbacks`' `tensor_inputs`
    (as diffusers' pipelines do), else `requested` (`callback_on_step_end_tensor_inputs`)."""
    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        return callback.tensor_inputs
    return requested


__all__ = ["GeneratedBatch", "SCLDMPipeline", "SCLDMPipelineOutput"]
