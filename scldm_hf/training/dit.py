"""Stage 2: train the `LatentDiTTransformer` with flow matching on cached latents of a frozen VAE.

The corpus is encoded once into ``<output_dir>/latent_cache``; the `CellConditioner` (labels and library-size model)
is fitted on the training cells; the DiT is trained with an EMA of its weights; the output folder is a whole
`SCLDMPipeline` (`save_pretrained`, EMA weights) with its model card.
"""

import dataclasses
import json
from collections.abc import Callable, Mapping

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import EMAModel
from torch import nn
from torch.utils.data import DataLoader

from scldm_hf.data import CorpusInfo
from scldm_hf.errors import ConditionError, ConfigurationError
from scldm_hf.evaluation import METRIC_DESCRIPTIONS, evaluate_generation
from scldm_hf.flow_matching import DropoutMode, flow_matching_loss
from scldm_hf.loading import load_vae
from scldm_hf.models.conditioning import CellConditioner
from scldm_hf.models.modeling_scvae import SCVAEModel
from scldm_hf.models.transformer_latent_dit import LatentDiTTransformer
from scldm_hf.pipelines import SCLDMPipeline

from .config import DiTTrainingConfig
from .data import (
    LatentCollator,
    build_dataloader,
    corpus_to_anndata,
    encode_latent_cache,
    prepare_corpus,
    split_train_validation,
)
from .hub import publish_model_folder
from .loop import build_accelerator, build_lr_scheduler, build_optimizer, train_loop
from .model_card import PIPELINE_TEMPLATE, DataProvenance, render_model_card

logger = get_logger(__name__)

# cells whose latents give the standardisation statistics (enough for T x D means and stds)
MAX_STATISTICS_CELLS = 50_000


class FlowMatchingObjective(nn.Module):
    """The DiT's training forward, ``latents [B, T, D]`` + label ids -> flow-matching loss (scalar).

    Wrapping the loss in a module lets Accelerate's DDP wrapper and autocast see the whole training forward.
    """

    def __init__(self, transformer: LatentDiTTransformer, condition_dropout: float, dropout_mode: DropoutMode):
        super().__init__()
        self.transformer = transformer
        self.condition_dropout = condition_dropout
        self.dropout_mode = dropout_mode

    def forward(self, latents: torch.Tensor, covariates: dict[str, torch.LongTensor]) -> torch.Tensor:
        return flow_matching_loss(
            self.transformer, latents, covariates,
            condition_dropout=self.condition_dropout, dropout_mode=self.dropout_mode,
        )


def train_dit(config: DiTTrainingConfig) -> SCLDMPipeline:
    """Train a latent DiT from scratch on the latents of ``config.vae_name_or_path``; returns the saved pipeline."""
    if not config.vae_name_or_path:
        raise ConfigurationError("train_dit needs vae_name_or_path: the stage-1 output folder (train_vae.py).")
    accelerator = build_accelerator(config)
    set_seed(config.seed)
    vae = load_vae(config.vae_name_or_path)
    dataset, info = prepare_corpus(config, accelerator, vocab=vae.gene_vocab)
    covariates = conditioned_covariates(config, list(info.covariates))
    transformer = LatentDiTTransformer(
        num_latent_tokens=vae.config.num_latent_tokens,
        latent_dim=vae.config.latent_dim,
        covariate_num_labels={name: len(info.covariates[name]) for name in covariates},
        **dataclasses.asdict(config.model),
    )
    return fit_latent_dit(accelerator, config, vae, transformer, dataset, info, covariates)


def conditioned_covariates(config: DiTTrainingConfig, available: list[str]) -> list[str]:
    """``config.condition_on`` (default: every covariate of the data), checked against the data's covariates."""
    chosen = available if config.condition_on is None else config.condition_on
    missing = sorted(set(chosen) - set(available))
    if missing:
        raise ConditionError(
            f"condition_on {missing} are not covariates of the data {available}; add them when converting "
            "(covariates: [...]) or drop them from condition_on."
        )
    return list(chosen)


def fit_latent_dit(
    accelerator: Accelerator,
    config: DiTTrainingConfig,
    vae: SCVAEModel,
    transformer: LatentDiTTransformer,
    dataset: datasets.Dataset,
    info: CorpusInfo,
    covariates: list[str],
    conditioner: CellConditioner | None = None,
    scheduler: FlowMatchEulerDiscreteScheduler | None = None,
    frozen_label_rows: Mapping[str, list[int]] | None = None,
    base_model: str | None = None,
) -> SCLDMPipeline:
    """Encode `dataset` with the frozen `vae`, train `transformer` on it, save, evaluate and publish the pipeline.

    Args:
        dataset / info: cells whose covariate ids are the transformer's label ids.
        conditioner: the pipeline's conditioner (fine-tuning); default: fitted on the training cells.
        scheduler: the pipeline's sampling scheduler (fine-tuning); default: flow-matching Euler, ``shift=1``.
        frozen_label_rows: ``{covariate: row ids}`` of label embeddings kept bit-identical (gradients masked,
            no weight decay).
        base_model: the pipeline fine-tuned from, for the model card.
    """
    vae.requires_grad_(False).to(accelerator.device)
    cache = encode_latent_cache(vae, dataset, info, config.output_dir, config.encode_batch_size, accelerator)
    cache = cache.with_format("numpy", columns=["latents", *covariates])
    train, validation = split_train_validation(cache, config.validation_fraction, config.seed)
    if vae.config.latents_mean is None:
        # standardise per latent coordinate with training-cell statistics (a fine-tuned pipeline keeps its own)
        statistics_cells = train.select(range(min(len(train), MAX_STATISTICS_CELLS)))
        vae.set_latent_statistics(torch.from_numpy(statistics_cells[:]["latents"]))
    if conditioner is None:
        conditioner = CellConditioner.from_dataset(train.with_format(None), covariates)

    frozen_weights = [freeze_rows(transformer.covariate_embedders[name].weight, rows)
                      for name, rows in (frozen_label_rows or {}).items()]
    ema = None
    if config.use_ema:
        ema = EMAModel(transformer.parameters(), decay=config.ema_decay, model_cls=LatentDiTTransformer,
                       model_config=transformer.config)
    objective = FlowMatchingObjective(transformer, config.condition_dropout, config.condition_dropout_mode)
    dataloader = build_dataloader(train, config, LatentCollator(covariates, normalize=vae.normalize_latents))
    optimizer = build_optimizer(objective, config, frozen_from_decay=frozen_weights)
    lr_scheduler = build_lr_scheduler(optimizer, config, accelerator.num_processes)
    objective, optimizer, dataloader, lr_scheduler = accelerator.prepare(objective, optimizer, dataloader, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
    set_seed(config.seed, device_specific=True)
    train_loop(accelerator, config, objective, optimizer, lr_scheduler, dataloader,
               lambda model, batch: {"loss": model(batch["latents"], batch["covariates"])}, corpus=info,
               model_config=dict(transformer.config), ema=ema)

    transformer = accelerator.unwrap_model(objective).transformer
    if ema is not None:
        ema.copy_to(transformer.parameters())
    pipeline = SCLDMPipeline(vae=vae, transformer=transformer, conditioner=conditioner.to(accelerator.device),
                             scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=1.0))
    if accelerator.is_main_process:
        pipeline.save_pretrained(config.output_dir)
        metrics = {}
        if validation is not None:
            # the corpus splits like its latent cache (same number of rows and seed): the same held-out cells
            corpus_validation = split_train_validation(dataset, config.validation_fraction, config.seed)[1]
            metrics = evaluate_pipeline(pipeline, validation, corpus_validation, info, covariates, config)
        accelerator.log({f"final/{name}": value for name, value in metrics.items()}, step=config.max_train_steps)
        labels = conditioner.config.covariate_labels
        provenance = DataProvenance.from_corpus(info, len(train), len(validation or []), covariates=labels)
        example_conditions = {name: names[:1] for name, names in labels.items()}
        publish_model_folder(config, render_model_card(
            PIPELINE_TEMPLATE, config, provenance, metrics, library_name="diffusers", base_model=base_model,
            metric_descriptions=METRIC_DESCRIPTIONS,
            example_conditions=json.dumps(example_conditions, ensure_ascii=False) if labels else None,
        ))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return pipeline


def freeze_rows(weight: nn.Parameter, rows: list[int]) -> nn.Parameter:
    """Zero the gradient of `rows` of an embedding table `weight [V, H]` so they stay bit-identical under Adam."""
    keep = torch.ones(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    keep[rows] = 0
    weight.register_hook(lambda grad: grad * keep.to(grad.device, grad.dtype))
    return weight


def evaluate_pipeline(pipeline: SCLDMPipeline, validation: datasets.Dataset, corpus_validation: datasets.Dataset,
                      info: CorpusInfo, covariates: list[str], config: DiTTrainingConfig) -> dict[str, float]:
    """Held-out flow-matching loss, plus generation metrics when ``num_eval_cells`` > 0 (for the model card)."""
    metrics = {"validation_flow_matching_loss": validation_flow_matching_loss(
        pipeline.transformer, validation, covariates, config.batch_size, config.seed, pipeline.vae.normalize_latents)}
    if config.num_eval_cells:
        metrics |= generation_metrics(pipeline, corpus_validation, info, covariates, config)
    return metrics


@torch.no_grad()
def validation_flow_matching_loss(transformer: LatentDiTTransformer, validation: datasets.Dataset,
                                  covariates: list[str], batch_size: int, seed: int,
                                  normalize: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Flow-matching loss on held-out latents with fixed noise and no label dropout (comparable across runs)."""
    transformer.eval()
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for batch in DataLoader(validation, batch_size=batch_size, collate_fn=LatentCollator(covariates, normalize)):
        latents = batch["latents"].to(transformer.device)
        labels = {name: ids.to(transformer.device) for name, ids in batch["covariates"].items()}
        loss = flow_matching_loss(transformer, latents, labels, condition_dropout=0.0, generator=generator)
        total += loss.item() * len(latents)
    return total / len(validation)


def generation_metrics(pipeline: SCLDMPipeline, validation: datasets.Dataset, info: CorpusInfo,
                       covariates: list[str], config: DiTTrainingConfig) -> dict[str, float]:
    """`evaluate_generation` of ``num_eval_cells`` generated cells against the held-out cells (conditions of the
    held-out cells, resampled): its "mean" row, with ``n_real`` / ``n_generated`` the cells of the conditions that had
    enough of both. Skipped (empty) for an unconditional model."""
    if not covariates:
        logger.info("unconditional model: skipping the per-condition generation metrics", main_process_only=True)
        return {}
    real = corpus_to_anndata(validation, info, covariates)
    conditions = real.obs[covariates].sample(n=config.num_eval_cells, replace=True, random_state=config.seed)
    generated = pipeline(
        conditions=conditions.reset_index(drop=True).astype(str),
        num_inference_steps=config.eval_inference_steps,
        generator=torch.Generator().manual_seed(config.seed),
    ).cells
    try:
        table = evaluate_generation(real, generated, condition_key=covariates, seed=config.seed)
    except ConditionError as error:
        logger.warning(f"generation metrics skipped: {error}", main_process_only=True)
        return {}
    return {name: float(value) for name, value in table.loc["mean"].items() if np.isfinite(value)}
