"""Stage 1: train the `SCVAEModel` on a corpus; the output folder is a `save_pretrained` VAE with its model card."""

import dataclasses

import anndata as ad
import numpy as np
import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from scldm_hf.data import CellCollator, CorpusInfo
from scldm_hf.errors import ConfigurationError
from scldm_hf.loading import load_vae
from scldm_hf.models import SCVAEConfig, SCVAEModel

from .card_metrics import CardMetrics, RoundTripScore
from .config import VAETrainingConfig
from .data import build_dataloader, count_rows, first_rows, prepare_corpus, split_train_validation, spread_rows
from .hub import publish_model_folder
from .loop import build_accelerator, build_lr_scheduler, build_optimizer, removed_if_setup_fails, train_loop
from .model_card import VAE_TEMPLATE, DataProvenance, render_model_card

MAX_EVALUATION_CELLS = 2000


def train_vae(config: VAETrainingConfig, card_metrics: CardMetrics | None = None,
              adata: ad.AnnData | None = None) -> SCVAEModel:
    """Train (or, with ``init_from``, fine-tune) the VAE, save it in ``config.output_dir`` and return it.

    `card_metrics` adds reconstruction metrics of the held-out cells to the card (default: validation loss only)
    and, with early stopping, scores the held-out round trips (``round_trip_mmd``, logged; needed to stop on it).
    `adata`: train on these in-memory cells instead of ``config.data`` (see `prepare_corpus`).
    """
    if config.early_stopping_metric == "round_trip_mmd" and card_metrics is None:
        raise ConfigurationError("early_stopping_metric='round_trip_mmd' is scored by the evaluation protocol: pass "
                                 "card_metrics=scldm_hf.evaluation.ProtocolCardMetrics() (the training scripts do), "
                                 "or stop on validation_loss.")
    with removed_if_setup_fails(config.output_dir):
        accelerator = build_accelerator(config)
        set_seed(config.seed)
        model = load_vae(config.init_from) if config.init_from else None
        dataset, info = prepare_corpus(config, accelerator, vocab=model.gene_vocab if model else None, adata=adata)
    if model is None:
        model = SCVAEModel(SCVAEConfig(gene_names=info.genes, **dataclasses.asdict(config.model)))
    train, validation = split_train_validation(dataset, config.validation_fraction, config.seed)
    evaluation_cells = None if validation is None else first_rows(validation, MAX_EVALUATION_CELLS)
    round_trip = None
    if config.early_stopping_patience is not None and card_metrics is not None:
        round_trip = card_metrics.round_trip_distance(
            panel_counts(spread_rows(train, MAX_EVALUATION_CELLS), info, config.batch_size), config.seed)

    collator = CellCollator.from_corpus_info(info, covariates=[], max_genes=config.max_genes, seed=config.seed)
    dataloader = build_dataloader(train, config, collator, accelerator)
    optimizer = build_optimizer(model, config)
    lr_scheduler = build_lr_scheduler(optimizer, config, accelerator.num_processes)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    set_seed(config.seed, device_specific=True)
    progress = train_loop(
        accelerator, config, model, optimizer, lr_scheduler, dataloader, vae_losses, corpus=info,
        model_config=accelerator.unwrap_model(model).config.to_dict(), generators=[collator.generator],
        validation_scores=lambda vae: evaluate_vae(vae, evaluation_cells, info, config.batch_size,
                                                   round_trip=round_trip),
    )

    vae = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        vae.save_pretrained(config.output_dir)
        metrics = {} if validation is None else evaluate_vae(vae, evaluation_cells, info, config.batch_size,
                                                             card_metrics)
        accelerator.log({f"final/{name}": value for name, value in metrics.items()}, step=progress.global_step)
        num_validation = count_rows(validation)
        provenance = DataProvenance.from_corpus(info, info.num_cells - num_validation, num_validation)
        publish_model_folder(config, render_model_card(
            VAE_TEMPLATE, config, provenance, metrics, library_name="transformers", base_model=config.init_from,
            num_latent_tokens=vae.config.num_latent_tokens, latent_dim=vae.config.latent_dim,
            likelihood=vae.config.likelihood,
        ))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return vae


def vae_losses(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """The VAE objective of a `CellCollator` batch, with its terms for logging."""
    output = model(**batch)
    losses = {"loss": output.loss, "reconstruction_loss": output.reconstruction_loss}
    if output.kl_loss is not None:
        losses["kl_loss"] = output.kl_loss
    return losses


def evaluation_loader(cells, info: CorpusInfo, batch_size: int) -> DataLoader:
    """`cells` (corpus rows) in order, whole cells (no gene subsampling), in batches of `batch_size`."""
    return DataLoader(cells, batch_size=batch_size, collate_fn=CellCollator.from_corpus_info(info, covariates=[]))


def panel_counts(cells, info: CorpusInfo, batch_size: int) -> torch.Tensor:
    """``[N, G]`` counts of `cells` (corpus rows) over the corpus genes."""
    return torch.cat([batch["panel_counts"] for batch in evaluation_loader(cells, info, batch_size)])


@torch.no_grad()
def evaluate_vae(vae: SCVAEModel, validation, info: CorpusInfo, batch_size: int,
                 card_metrics: CardMetrics | None = None, round_trip: RoundTripScore | None = None
                 ) -> dict[str, float]:
    """Validation loss of (the first `MAX_EVALUATION_CELLS`) held-out cells, plus `card_metrics.reconstruction` of
    them and their ``round_trip_mmd`` (`round_trip`) when given."""
    vae.eval()
    cells = first_rows(validation, MAX_EVALUATION_CELLS)
    loader = evaluation_loader(cells, info, batch_size)
    losses, counts, means, inverse_dispersions = [], [], [], []
    for batch in loader:
        batch = {name: value.to(vae.device) for name, value in batch.items()}
        output = vae(**batch)
        losses.append(output.loss.item() * len(batch["library_size"]))
        counts.append(batch["panel_counts"])
        means.append(output.mean)
        if output.inverse_dispersion is not None:
            inverse_dispersions.append(output.inverse_dispersion.expand_as(output.mean))
    metrics = {"validation_loss": float(np.sum(losses) / len(cells))}
    counts, means = torch.cat(counts).cpu(), torch.cat(means).cpu()
    inverse_dispersion = torch.cat(inverse_dispersions).cpu() if inverse_dispersions else None
    if inverse_dispersion is not None and card_metrics is not None:
        metrics |= card_metrics.reconstruction(counts, means, inverse_dispersion)
    if round_trip is not None:
        metrics["round_trip_mmd"] = round_trip(counts, means, inverse_dispersion)
    return metrics
