"""Stage 2: train the `LatentDiTTransformer` with flow matching on cached latents of a frozen VAE.

The corpus is encoded once into ``<output_dir>/latent_cache``; the `CellConditioner` (labels and library-size model)
is fitted on the training cells; the DiT is trained with an EMA of its weights; the output folder is a whole
`SCLDMPipeline` (`save_pretrained`, EMA weights) with its model card.
"""

import dataclasses
import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import anndata as ad
import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import EMAModel
from torch import nn
from torch.utils.data import DataLoader

from scldm_hf.data import CorpusInfo
from scldm_hf.data.corpus import SHARD_GLOB, open_arrow_shards
from scldm_hf.errors import ConditionError, ConfigurationError, check_choice
from scldm_hf.flow_matching import Coupling, DropoutMode, TimestepSampling, flow_matching_loss
from scldm_hf.loading import load_vae
from scldm_hf.models.conditioning import CellConditioner
from scldm_hf.models.modeling_scvae import SCVAEModel
from scldm_hf.models.transformer_latent_dit import LatentDiTTransformer
from scldm_hf.pipelines import SCLDMPipeline

from .card_metrics import CardMetrics, GenerationScore
from .checkpointing import TrainingProgress
from .config import DiTTrainingConfig, LibrarySizeModel
from .data import (
    LATENT_CACHE_DIR,
    LatentCollator,
    TrainingData,
    batches_in_storage_order,
    build_dataloader,
    corpus_to_anndata,
    count_rows,
    encode_latent_cache,
    first_rows,
    prepare_corpus,
    split_train_validation,
    spread_rows,
)
from .hub import TRAINING_CONFIG_FILE, publish_model_folder
from .loop import build_accelerator, build_lr_scheduler, build_optimizer, removed_if_setup_fails, train_loop
from .model_card import PIPELINE_TEMPLATE, DataProvenance, library_size_description, render_model_card

logger = get_logger(__name__)

# cells whose latents give the standardisation statistics (enough for T x D means and stds)
MAX_STATISTICS_CELLS = 50_000
# training cells the card's evaluation PCA is fitted on
MAX_REFERENCE_CELLS = 10_000
# held-out cells the generation_mmd early-stopping score compares with
MAX_STOPPING_CELLS = 2_000
# latent rows per batch of the library-size fit
LIBRARY_SIZE_BATCH_CELLS = 4_096


class FlowMatchingObjective(nn.Module):
    """The DiT's training forward, ``latents [B, T, D]`` + label ids -> flow-matching loss (scalar).

    Wrapping the loss in a module lets Accelerate's DDP wrapper and autocast see the whole training forward.
    """

    def __init__(self, transformer: LatentDiTTransformer, condition_dropout: float, dropout_mode: DropoutMode,
                 coupling: Coupling, timestep_sampling: TimestepSampling = "uniform"):
        super().__init__()
        self.transformer = transformer
        self.condition_dropout = condition_dropout
        self.dropout_mode = dropout_mode
        self.coupling = coupling
        self.timestep_sampling = timestep_sampling

    def forward(self, latents: torch.Tensor, covariates: dict[str, torch.LongTensor]) -> torch.Tensor:
        return flow_matching_loss(
            self.transformer, latents, covariates, timestep_sampling=self.timestep_sampling,
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
    conditioner = CellConditioner(covariate_labels={name: list(info.covariates[name]) for name in covariates})
    pipeline = SCLDMPipeline(vae=vae, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                             conditioner=conditioner)
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
    generation_score = stopping_generation_score(config, dataset, info, covariates, card_metrics)
    pipeline.vae.requires_grad_(False)
    pipeline.to(accelerator.device)
    train, validation = encode_latents(accelerator, config, pipeline.vae, dataset, info, covariates)
    if pipeline.vae.config.latents_mean is None:  # a fine-tuned pipeline keeps its own statistics
        standardize_latents(pipeline.vae, train)
    fit_library_size_model(pipeline, train, covariates, config.library_size_model, extend=base_model is not None)
    progress = train_transformer(accelerator, config, pipeline, train, validation, info, covariates,
                                 frozen_label_rows, generation_score)
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
    (train, validation) like the corpus; rows hold the ``latents``, ``library_size`` and `covariates` as numpy
    values."""
    cache = encode_latent_cache(vae, dataset, info, config.output_dir, config.encode_batch_size, accelerator,
                                streaming=config.streaming)
    splits = split_train_validation(cache, config.validation_fraction, config.seed)
    return tuple(None if rows is None else
                 rows.select_columns(["latents", "library_size", *covariates]).with_format("numpy")
                 for rows in splits)


def standardize_latents(vae: SCVAEModel, train: TrainingData) -> None:
    """Write per-coordinate latent means and stds of (the first `MAX_STATISTICS_CELLS`) training cells into the VAE."""
    statistics_cells = first_rows(train, MAX_STATISTICS_CELLS).with_format("numpy")
    vae.set_latent_statistics(torch.from_numpy(statistics_cells[:]["latents"]))


def fit_library_size_model(pipeline: SCLDMPipeline, train: TrainingData, covariates: list[str],
                           library_size_model: LibrarySizeModel, extend: bool) -> None:
    """Fit the conditioner's library-size model on the training latent rows (`library_size_model` "latent": the
    latent regression; "nearest": reference cells for the nearest-cell draw; "labels": the per-label log-normals
    alone), or with `extend` (fine-tuning) add the new cells' label groups to the pretrained model, whichever kind it
    is. Streams `train`."""
    conditioner = pipeline.conditioner

    def batches():
        for batch in batches_in_storage_order(train, LIBRARY_SIZE_BATCH_CELLS):
            features = pipeline.vae.normalize_latents(torch.as_tensor(batch["latents"])).flatten(1)
            yield ({name: torch.as_tensor(batch[name]) for name in conditioner.covariate_names},
                   torch.as_tensor(batch["library_size"]), features)

    if extend:
        missing = sorted(set(conditioner.covariate_names) - set(covariates))
        if missing:
            logger.warning(f"the new data lacks covariates {missing}: library sizes of its labels use the pooled fit",
                           main_process_only=True)
            return
        conditioner.add_library_size_groups(batches)
    elif library_size_model == "latent":
        conditioner.fit_latent_library_size(batches)
    elif library_size_model == "nearest":
        conditioner.fit_nearest_library_size(batches)
    else:
        conditioner.fit_library_size_groups(batches)


def refit_library_size_model(pipeline_dir: str | Path, library_size_model: LibrarySizeModel = "latent") -> SCLDMPipeline:
    """Refit the library-size model of a pipeline trained by `train_dit` in `pipeline_dir` (e.g. one trained before
    the latent model existed) on the training rows of its own latent cache, split as its training split them, and
    save the pipeline in place (with the current model code); its model card's sentence on library sizes and the
    ``library_size_model`` of its ``training_config.yaml`` are rewritten to the new model. The VAE and DiT weights are
    unchanged. Returns the reloaded pipeline."""
    check_choice("library_size_model", library_size_model, LibrarySizeModel)
    pipeline_dir = Path(pipeline_dir)
    cache_dir = pipeline_dir / LATENT_CACHE_DIR
    if not cache_dir.is_dir():
        raise ConfigurationError(f"{pipeline_dir} has no {LATENT_CACHE_DIR}/: only a pipeline trained by train_dit "
                                 "in that folder (with its latent cache kept) can be refitted.")
    recipe = yaml.safe_load((pipeline_dir / TRAINING_CONFIG_FILE).read_text())
    pipeline = SCLDMPipeline.from_pretrained(pipeline_dir)
    covariates = pipeline.conditioner.covariate_names
    cache = open_arrow_shards(sorted(cache_dir.glob(SHARD_GLOB)))
    train = split_train_validation(cache, recipe["validation_fraction"], recipe["seed"])[0]
    train = train.select_columns(["latents", "library_size", *covariates]).with_format("numpy")
    labels = pipeline.conditioner.config.covariate_labels
    old_description = library_size_description(pipeline.conditioner)
    pipeline.register_modules(conditioner=CellConditioner(covariate_labels=labels))
    fit_library_size_model(pipeline, train, covariates, library_size_model, extend=False)
    pipeline.save_pretrained(pipeline_dir)
    recipe["library_size_model"] = library_size_model
    (pipeline_dir / TRAINING_CONFIG_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))
    card_path = pipeline_dir / "README.md"
    card = card_path.read_text() if card_path.is_file() else ""
    if old_description in card:
        card_path.write_text(card.replace(old_description, library_size_description(pipeline.conditioner)))
    else:
        warnings.warn(f"{card_path} does not describe the old library-size model as this version writes it; "
                      "update its description of library sizes by hand.", stacklevel=2)
    return SCLDMPipeline.from_pretrained(pipeline_dir)


def stopping_generation_score(config: DiTTrainingConfig, dataset: TrainingData, info: CorpusInfo,
                              covariates: list[str], card_metrics: CardMetrics | None) -> GenerationScore | None:
    """``generation_mmd`` of a pipeline on (up to `MAX_STOPPING_CELLS`) held-out cells when early stopping watches it
    (None otherwise: generating cells at every check costs more than the loss); needs `card_metrics` and labels."""
    if config.early_stopping_patience is None or config.early_stopping_metric != "generation_mmd":
        return None
    if card_metrics is None or not covariates:
        raise ConfigurationError(
            "early_stopping_metric='generation_mmd' generates cells for the held-out cells' labels under the evaluation "
            "protocol: it needs a conditioned model (covariates) and card_metrics=scldm_hf.evaluation."
            "ProtocolCardMetrics() (the training scripts pass it); or stop on validation_loss.")
    reference, held_out = reference_and_held_out_cells(dataset, info, covariates, config, MAX_STOPPING_CELLS)
    return card_metrics.generation_distance(reference, held_out, covariates,
                                            num_inference_steps=config.eval_inference_steps, seed=config.seed)


def reference_and_held_out_cells(dataset: TrainingData, info: CorpusInfo, covariates: list[str],
                                 config: DiTTrainingConfig, num_held_out: int) -> tuple[ad.AnnData, ad.AnnData]:
    """(up to `MAX_REFERENCE_CELLS`, evenly spaced) training cells and `num_held_out` seeded-shuffled validation cells
    of the corpus as AnnData (counts, `covariates` in obs); the corpus splits like its latent cache."""
    train_cells, validation_cells = split_train_validation(dataset, config.validation_fraction, config.seed)
    held_out = first_rows(validation_cells.shuffle(seed=config.seed), num_held_out)
    reference = spread_rows(train_cells, MAX_REFERENCE_CELLS)
    return corpus_to_anndata(reference, info, covariates), corpus_to_anndata(held_out, info, covariates)


def train_transformer(accelerator: Accelerator, config: DiTTrainingConfig, pipeline: SCLDMPipeline,
                      train: TrainingData, validation: TrainingData | None, info: CorpusInfo, covariates: list[str],
                      frozen_label_rows: Mapping[str, list[int]] | None,
                      generation_score: GenerationScore | None = None) -> TrainingProgress:
    """Flow-matching training of ``pipeline.transformer`` in place on latent rows `train` of the corpus `info`
    (recorded in checkpoints), early-stopped on the `validation` rows when configured (their flow-matching loss and,
    given `generation_score`, ``generation_mmd`` of the pipeline); ends with the EMA weights copied in."""
    transformer, normalize = pipeline.transformer, pipeline.vae.normalize_latents
    frozen_weights = [freeze_rows(transformer.covariate_embedders[name].weight, rows)
                      for name, rows in (frozen_label_rows or {}).items()]
    ema = None
    if config.use_ema:
        ema = EMAModel(transformer.parameters(), decay=config.ema_decay, model_cls=LatentDiTTransformer,
                       model_config=transformer.config)
    objective = FlowMatchingObjective(transformer, config.condition_dropout, config.condition_dropout_mode,
                                      config.coupling, config.timestep_sampling)
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
        validation_scores=lambda model: validation_scores(pipeline, validation, covariates, config, generation_score),
    )
    if ema is not None:
        ema.copy_to(accelerator.unwrap_model(objective).transformer.parameters())
    return progress


def validation_scores(pipeline: SCLDMPipeline, validation: TrainingData, covariates: list[str],
                      config: DiTTrainingConfig, generation_score: GenerationScore | None) -> dict[str, float]:
    """Held-out scores of the pipeline's current transformer weights: ``validation_loss`` and ``generation_mmd``."""
    scores = {"validation_loss": validation_flow_matching_loss(
        pipeline.transformer, validation, covariates, config.batch_size, config.seed, pipeline.vae.normalize_latents)}
    if generation_score is not None:
        progress_bar_config = dict(getattr(pipeline, "_progress_bar_config", {}))
        pipeline.set_progress_bar_config(disable=True)
        try:
            scores["generation_mmd"] = generation_score(pipeline)
        finally:  # an error inside the check leaves the user's progress bars as they were
            pipeline.set_progress_bar_config(**progress_bar_config)
    return scores


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
        library_size_description=library_size_description(pipeline.conditioner),
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
    reference, held_out = reference_and_held_out_cells(dataset, info, covariates, config, config.num_eval_cells)
    try:
        return metrics | card_metrics.generation(pipeline, reference, held_out, covariates,
                                                 num_inference_steps=config.eval_inference_steps, seed=config.seed)
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
