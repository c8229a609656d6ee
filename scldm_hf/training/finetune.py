"""Fine-tune a trained `SCLDMPipeline` on new data whose covariates bring new labels or new covariates.

Labels the model does not know are appended (`SCLDMPipeline.add_condition_labels` / `add_condition`), so every old
label keeps its id; with ``freeze_existing_labels`` the old label embeddings and null rows stay bit-identical. The
library-size model gains the label combinations of the new training cells and keeps the old ones. The VAE is reused
as is (``freeze_vae``) or first fine-tuned on the new cells.
"""

import dataclasses
from pathlib import Path

import anndata as ad
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from scldm_hf.loading import load_pipeline, resolve_model_path
from scldm_hf.pipelines import SCLDMPipeline

from .card_metrics import CardMetrics
from .config import FinetuneConfig, TrainingConfig, VAETrainingConfig
from .data import align_covariate_labels, prepare_corpus
from .dit import conditioned_covariates, fit_latent_dit
from .loop import build_accelerator, removed_if_setup_fails
from .vae import train_vae

logger = get_logger(__name__)
VAE_FINETUNE_DIR = "vae_finetune"


def finetune(config: FinetuneConfig, card_metrics: CardMetrics | None = None,
             adata: ad.AnnData | None = None) -> SCLDMPipeline:
    """Fine-tune ``config.pipeline_name_or_path`` on ``config.data``; returns the saved pipeline.

    `card_metrics` scores the cards' metrics (see `train_vae` and `train_dit`); `adata` replaces ``config.data``
    with in-memory cells (see `prepare_corpus`).
    """
    pretrained_dir = resolve_model_path(config.pipeline_name_or_path, config.local_files_only)
    vae = train_vae(vae_finetune_config(config, pretrained_dir), card_metrics, adata) if not config.freeze_vae else None
    with removed_if_setup_fails(config.output_dir):
        accelerator = build_accelerator(config)
        set_seed(config.seed)
        pipeline = load_pipeline(pretrained_dir)
        if vae is not None:
            pipeline.register_modules(vae=vae)
        dataset, info = prepare_corpus(config, accelerator, vocab=pipeline.vae.gene_vocab, adata=adata)
        covariates = conditioned_covariates(config, list(info.covariates))

    old_num_labels = dict(pipeline.transformer.config.covariate_num_labels)
    add_new_labels(pipeline, {name: info.covariates[name] for name in covariates})
    labels = pipeline.conditioner.config.covariate_labels
    dataset = align_covariate_labels(dataset, {name: labels[name] for name in covariates})

    frozen_rows = None
    if config.freeze_existing_labels:
        # old labels keep ids 0..n-1; the null row moved to the end of the grown table
        frozen_rows = {name: [*range(num), len(labels[name])] for name, num in old_num_labels.items()}
    return fit_latent_dit(accelerator, config, pipeline, dataset, info, covariates, frozen_label_rows=frozen_rows,
                          base_model=config.pipeline_name_or_path, card_metrics=card_metrics)


def add_new_labels(pipeline: SCLDMPipeline, data_labels: dict[str, list[str]]) -> None:
    """Append the labels of `data_labels` the pipeline lacks (and covariates it lacks) after the existing ones."""
    known = pipeline.conditioner.config.covariate_labels
    for name, labels in data_labels.items():
        if name not in known:
            logger.info(f"new covariate {name!r} with {len(labels)} labels", main_process_only=True)
            pipeline.add_condition(name, list(labels))
            continue
        new_labels = [label for label in labels if label not in known[name]]
        if new_labels:
            logger.info(f"covariate {name!r}: adding labels {new_labels}", main_process_only=True)
            pipeline.add_condition_labels(name, new_labels)


def vae_finetune_config(config: FinetuneConfig, pretrained_dir: Path) -> VAETrainingConfig:
    """Stage-1 settings for fine-tuning the pipeline's VAE on the new data (in ``<output_dir>/vae_finetune``)."""
    shared = {spec.name: getattr(config, spec.name) for spec in dataclasses.fields(TrainingConfig)}
    return VAETrainingConfig(**shared | {
        "output_dir": str(Path(config.output_dir) / VAE_FINETUNE_DIR),
        "init_from": str(pretrained_dir / "vae"),
        "learning_rate": config.vae_learning_rate,
        "max_train_steps": config.vae_max_train_steps,
        "lr_warmup_steps": min(config.lr_warmup_steps, config.vae_max_train_steps),
        "push_to_hub": False,
        # generation_mmd scores the DiT; the VAE fine-tune then stops on its own held-out loss
        "early_stopping_metric": (config.early_stopping_metric
                                  if config.early_stopping_metric in VAETrainingConfig.early_stopping_metrics
                                  else "validation_loss"),
    })
