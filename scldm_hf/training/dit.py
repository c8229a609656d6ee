"""Stage 2: train the `LatentDiTTransformer` with flow matching on cached latents of a frozen VAE.

The corpus is encoded once into ``<output_dir>/latent_cache``; the `CellConditioner` (labels and library-size model)
is fitted on the training cells; the DiT is trained with an EMA of its weights; the output folder is a whole
`SCLDMPipeline` (`save_pretrained`, EMA weights) with its model card.
"""

import dataclasses
import json
from collections.abc import Callable, Mapping

import anndata as ad
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
from scldm_hf.flow_matching import Coupling, DropoutMode, flow_matching_loss
from scldm_hf.loading import load_vae
from scldm_hf.models.conditioning import CellConditioner
from scldm_hf.models.modeling_scvae import SCVAEModel
from scldm_hf.models.transformer_latent_dit import LatentDiTTransformer
from scldm_hf.pipelines import SCLDMPipeline

from .card_metrics import CardMetrics
from .checkpointing import TrainingProgress
from .config import DiTTrainingConfig
from .data import (
    LatentCollator,
    TrainingData,
    build_dataloader,
    corpus_to_anndata,
    count_rows,
    encode_latent_cache,
    first_rows,
    prepare_corpus,
    split_train_validation,
)
from .hub import publish_model_folder
from .loop import build_accelerator, build_lr_scheduler, build_optimizer, removed_if_setup_fails, train_loop
from .model_card import PIPELINE_TEMPLATE, DataProvenance, render_model_card

logger = get_logger(__name__)

# cells whose latents give the standardisation statistics (enough for T x D means and stds)
MAX_STATISTICS_CELLS = 50_000
# training cells the card's evaluation PCA is fitted on
MAX_REFERENCE_CELLS = 10_000


class FlowMatchingObjective(nn.Module):
    """The DiT's training forward, ``latents [B, T, D]`` + label ids -> flow-matching loss (scalar).

    Wrapping the loss in a module lets Accelerate's DDP wrapper and autocast see the whole training forward.
    """

    def __init__(self, transformer: LatentDiTTransformer, condition_dropout: float, dropout_mode: DropoutMode,
                 coupling: Coupling):
        super().__init__()
        self.transformer = transformer
        self.condition_dropout = condition_dropout
        self.dropout_mode = dropout_mode
        self.coupling = coupling

    def forward(self, latents: torch.Tensor, covariates: dict[str, torch.LongTensor]) -> torch.Tensor:
        return flow_matching_loss(
            self.transformer, latents, covariates,
            condition_dropout=self.condition_dropout, dropout_mode=self.dropout_mode, coupling=self.coupling,
        )


def train_dit(config: DiTTrainingConfig, card_metrics: CardMetrics | None = None,
              adata: ad.AnnData | None = None) -> SCLDMPipeline:
    """Train a latent DiT from scratch on the latents of ``config.vae_name_or_path``; returns the saved pipeline.

    `card_metrics` scores the model card's generation metrics (``num_eval_cells`` > 0); without it the card reports
    the held-out flow-matching loss only. `adata`: train on these in-memory cells instead of ``config.data`` (see
    `prepare_corpus`).
    """
    if not config.vae_name_or_path:
        raise ConfigurationError("train_dit needs vae_name_or_path: the stage-1 output folder (train_vae.py).")
    with removed_if_setup_fails(config.output_dir):
        accelerator = build_accelerator(config)
        set_seed(config.seed)
        vae = load_vae(config.vae_name_or_path)
        dataset, info = prepare_corpus(config, accelerator, vocab=vae.gene_vocab, adata=adata)
        covariates = conditioned_covariates(config, list(info.covariates))
    transformer = LatentDiTTransformer(
        num_latent_tokens=vae.config.num_latent_tokens,
        latent_dim=vae.config.latent_dim,
        covariate_num_labels={name: len(info.covariates[name]) for name in covariates},
        **dataclasses.asdict(config.model),
    )
    train_cells = split_train_validation(dataset, config.validation_fraction, config.seed)[0]
    pipeline = SCLDMPipeline(vae=vae, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                             conditioner=CellConditioner.from_dataset(train_cells, covariates))
    return fit_latent_dit(accelerator, config, pipeline, dataset, info, covariates, card_metrics=card_metrics)


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
    pipeline: SCLDMPipeline,
    dataset: TrainingData,
    info: CorpusInfo,
    covariates: list[str],
    *,
    frozen_label_rows: Mapping[str, list[int]] | None = None,
    base_model: str | None = None,
    card_metrics: CardMetrics | None = None,
) -> SCLDMPipeline:
    """Train ``pipeline.transformer`` on `dataset` encoded by the frozen ``pipeline.vae``; save, card and publish.

    Args:
        pipeline: the VAE, the transformer to train (label ids = the covariate ids of `dataset`), the conditioner
            and the sampling scheduler saved with it.
        frozen_label_rows: ``{covariate: row ids}`` of label embeddings kept bit-identical (fine-tuning).
        base_model: the pipeline fine-tuned from, for the model card.
        card_metrics: scores the card's generation metrics (see `train_dit`).
    """
    pipeline.vae.requires_grad_(False)
    pipeline.to(accelerator.device)
    train, validation = encode_latents(accelerator, config, pipeline.vae, dataset, info, covariates)
    if pipeline.vae.config.latents_mean is None:  # a fine-tuned pipeline keeps its own statistics
        standardize_latents(pipeline.vae, train)
    progress = train_transformer(accelerator, config, pipeline.transformer, train, validation, info, covariates,
                                 pipeline.vae.normalize_latents, frozen_label_rows)
    if accelerator.is_main_process:
        pipeline.save_pretrained(config.output_dir)
        metrics = pipeline_card_metrics(pipeline, dataset, info, validation, covariates, config, card_metrics)
        accelerator.log({f"final/{name}": value for name, value in metrics.items()}, step=progress.global_step)
        descriptions = card_metrics.descriptions(list(metrics)) if card_metrics else {}
        num_validation = count_rows(validation)
        publish_pipeline(config, pipeline, info, info.num_cells - num_validation, num_validation, metrics,
                         descriptions, base_model)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return pipeline


def encode_latents(accelerator: Accelerator, config: DiTTrainingConfig, vae: SCVAEModel, dataset: TrainingData,
                   info: CorpusInfo, covariates: list[str]) -> tuple[TrainingData, TrainingData | None]:
    """The latent cache of `dataset` (``<output_dir>/latent_cache``, streamed with ``config.streaming``), split into
    (train, validation) like the corpus; rows hold the ``latents`` and `covariates` as numpy values."""
    cache = encode_latent_cache(vae, dataset, info, config.output_dir, config.encode_batch_size, accelerator,
                                streaming=config.streaming)
    splits = split_train_validation(cache, config.validation_fraction, config.seed)
    return tuple(None if rows is None else rows.select_columns(["latents", *covariates]).with_format("numpy")
                 for rows in splits)


def standardize_latents(vae: SCVAEModel, train: TrainingData) -> None:
    """Write per-coordinate latent means and stds of (the first `MAX_STATISTICS_CELLS`) training cells into the VAE."""
    statistics_cells = first_rows(train, MAX_STATISTICS_CELLS).with_format("numpy")
    vae.set_latent_statistics(torch.from_numpy(statistics_cells[:]["latents"]))


def train_transformer(accelerator: Accelerator, config: DiTTrainingConfig, transformer: LatentDiTTransformer,
                      train: TrainingData, validation: TrainingData | None, info: CorpusInfo,
                      covariates: list[str], normalize: Callable[[torch.Tensor], torch.Tensor],
                      frozen_label_rows: Mapping[str, list[int]] | None) -> TrainingProgress:
    """Flow-matching training of `transformer` in place on latent rows `train` of the corpus `info` (recorded in
    checkpoints), early-stopped on the `validation` rows when configured; ends with the EMA weights copied in."""
    frozen_weights = [freeze_rows(transformer.covariate_embedders[name].weight, rows)
                      for name, rows in (frozen_label_rows or {}).items()]
    ema = None
    if config.use_ema:
        ema = EMAModel(transformer.parameters(), decay=config.ema_decay, model_cls=LatentDiTTransformer,
                       model_config=transformer.config)
    objective = FlowMatchingObjective(transformer, config.condition_dropout, config.condition_dropout_mode,
                                      config.coupling)
    dataloader = build_dataloader(train, config, LatentCollator(covariates, normalize=normalize), accelerator)
    optimizer = build_optimizer(objective, config, frozen_from_decay=frozen_weights)
    lr_scheduler = build_lr_scheduler(optimizer, config, accelerator.num_processes)
    objective, optimizer, lr_scheduler = accelerator.prepare(objective, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
    set_seed(config.seed, device_specific=True)
    progress = train_loop(
        accelerator, config, objective, optimizer, lr_scheduler, dataloader,
        lambda model, batch: {"loss": model(batch["latents"], batch["covariates"])}, corpus=info,
        model_config=dict(transformer.config), ema=ema,
        validation_scores=lambda model: {"validation_loss": validation_flow_matching_loss(
            model.transformer, validation, covariates, config.batch_size, config.seed, normalize)},
    )
    if ema is not None:
        ema.copy_to(accelerator.unwrap_model(objective).transformer.parameters())
    return progress


def publish_pipeline(config: DiTTrainingConfig, pipeline: SCLDMPipeline, info: CorpusInfo, num_train_cells: int,
                     num_validation_cells: int, metrics: dict[str, float], metric_descriptions: dict[str, str],
                     base_model: str | None) -> None:
    """Write the pipeline's model card into ``config.output_dir`` and push the folder when asked."""
    labels = pipeline.conditioner.config.covariate_labels
    provenance = DataProvenance.from_corpus(info, num_train_cells, num_validation_cells, covariates=labels)
    example_conditions = {name: names[:1] for name, names in labels.items()}
    publish_model_folder(config, render_model_card(
        PIPELINE_TEMPLATE, config, provenance, metrics, library_name="diffusers", base_model=base_model,
        metric_descriptions=metric_descriptions,
        example_conditions=json.dumps(example_conditions, ensure_ascii=False) if labels else None,
    ))


def freeze_rows(weight: nn.Parameter, rows: list[int]) -> nn.Parameter:
    """Zero the gradient of `rows` of an embedding table `weight [V, H]` so they stay bit-identical under Adam."""
    keep = torch.ones(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    keep[rows] = 0
    weight.register_hook(lambda grad: grad * keep.to(grad.device, grad.dtype))
    return weight


def pipeline_card_metrics(pipeline: SCLDMPipeline, dataset: TrainingData, info: CorpusInfo,
                          validation: TrainingData | None, covariates: list[str], config: DiTTrainingConfig,
                          card_metrics: CardMetrics | None) -> dict[str, float]:
    """The card's metrics: held-out flow-matching loss, plus `card_metrics.generation` when ``num_eval_cells`` > 0
    (reference = training cells, held out = validation cells; the corpus splits like its latent cache)."""
    if validation is None:
        return {}
    metrics = {"validation_flow_matching_loss": validation_flow_matching_loss(
        pipeline.transformer, validation, covariates, config.batch_size, config.seed, pipeline.vae.normalize_latents)}
    if not config.num_eval_cells:
        return metrics
    if card_metrics is None or not covariates:
        logger.warning("num_eval_cells is set but generation metrics need a conditioned model and card_metrics "
                       "(run the training scripts or `scldm train`): the card reports the loss only",
                       main_process_only=True)
        return metrics
    train_cells, validation_cells = split_train_validation(dataset, config.validation_fraction, config.seed)
    held_out = first_rows(validation_cells.shuffle(seed=config.seed), config.num_eval_cells)
    reference = first_rows(train_cells, MAX_REFERENCE_CELLS)
    try:
        return metrics | card_metrics.generation(
            pipeline, corpus_to_anndata(reference, info, covariates), corpus_to_anndata(held_out, info, covariates),
            covariates, num_inference_steps=config.eval_inference_steps, seed=config.seed)
    except ConditionError as error:
        logger.warning(f"generation metrics skipped: {error}", main_process_only=True)
        return metrics


@torch.no_grad()
def validation_flow_matching_loss(transformer: LatentDiTTransformer, validation: TrainingData,
                                  covariates: list[str], batch_size: int, seed: int,
                                  normalize: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Flow-matching loss on held-out latents with fixed noise and no label dropout (comparable across runs)."""
    transformer.eval()
    generator = torch.Generator().manual_seed(seed)
    total, num_cells = 0.0, 0
    for batch in DataLoader(validation, batch_size=batch_size, collate_fn=LatentCollator(covariates, normalize)):
        latents = batch["latents"].to(transformer.device)
        labels = {name: ids.to(transformer.device) for name, ids in batch["covariates"].items()}
        loss = flow_matching_loss(transformer, latents, labels, condition_dropout=0.0, generator=generator)
        total, num_cells = total + loss.item() * len(latents), num_cells + len(latents)
    return total / num_cells
