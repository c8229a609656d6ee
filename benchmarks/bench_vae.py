"""VAE reconstruction benchmark: our permutation-invariant VAE against scVI on held-out PBMC68k cells.

The 700 bundled PBMC68k cells are split 80/20, stratified by ``bulk_labels`` (seed 0). Both models train on CPU (ours
on a GPU with ``--device auto`` when one is present) on the training cells with a comparable budget (same number of
epochs), then reconstruct the held-out cells from their own counts (posterior mean latents, observed library sizes).
Our VAE defaults to scLDM's scale (128 latent tokens x 16 dims, width 128, two self-attention blocks on each side),
about 2 s per step on one CPU thread. Reported per model:

- reconstruction Pearson (scLDM definition): per gene, Pearson r across held-out cells between true and reconstructed
  expression in log1p(counts / total * 1e4) space, averaged over genes; also the per-cell Pearson across genes;
- MSE in that space and the negative binomial NLL per cell (summed over genes);
- training throughput (cells/s), wall time of the whole training call, parameter count.

    python benchmarks/bench_vae.py
    python benchmarks/bench_vae.py --max-train-steps 300 --scvi-epochs 30   # quick look
    python benchmarks/bench_vae.py --device auto --mixed-precision bf16 --scvi-epochs 0   # ours alone, on a GPU
"""

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader

from scldm_hf.data import CellCollator, anndata_to_dataset, load_pbmc68k_counts
from scldm_hf.evaluation import reconstruction_metrics
from scldm_hf.evaluation.genes import columnwise_pearson
from scldm_hf.evaluation.preprocessing import log_normalize
from scldm_hf.models import SCVAEModel
from scldm_hf.training.config import VAETrainingConfig
from scldm_hf.training.vae import train_vae


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both models")
    parser.add_argument("--device", choices=["cpu", "auto"], default="cpu",
                        help="where our VAE trains: the CPU, or an accelerator when one is present (scVI: always CPU)")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument("--max-train-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-latent-tokens", type=int, default=128)
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2, help="encoder and decoder self-attention blocks each")
    parser.add_argument("--value-encoding", choices=["log1p", "concat"], default="log1p")
    parser.add_argument("--count-transform", choices=["log1p", "normalized_log1p"], default="normalized_log1p")
    parser.add_argument("--thinning-min-fraction", type=float, default=0.0,
                        help="binomial thinning of training cells (SCVAEConfig.thinning_min_fraction); <= 0 turns it off")
    parser.add_argument("--scvi-epochs", type=int, default=None,
                        help="default: as many epochs as our VAE; 0 leaves scVI out")
    return parser.parse_args()


def stratified_split(adata: AnnData, seed: int) -> tuple[AnnData, AnnData]:
    """80/20 split of the cells, stratified by ``bulk_labels``."""
    train_cells, test_cells = train_test_split(
        np.arange(adata.n_obs), test_size=0.2, stratify=adata.obs["bulk_labels"], random_state=seed
    )
    return adata[np.sort(train_cells)].copy(), adata[np.sort(test_cells)].copy()


def reconstruction_scores(counts: np.ndarray, mean: np.ndarray, inverse_dispersion: np.ndarray) -> dict[str, float]:
    """`reconstruction_metrics` (per-gene Pearson, MSE, NB NLL) plus the per-cell Pearson across genes."""
    scores = reconstruction_metrics(counts, mean, inverse_dispersion)
    true_log, predicted_log = log_normalize(counts).toarray(), log_normalize(mean).toarray()
    scores["per_cell_pearson"] = float(np.nanmean(columnwise_pearson(true_log.T, predicted_log.T)))
    return scores


def train_ours(train: AnnData, args: argparse.Namespace, workdir: Path) -> tuple[SCVAEModel, float]:
    """Train our VAE with the package's training loop (`train_vae`); returns the model and the wall time."""
    data_path = workdir / "train.h5ad"
    train.write_h5ad(data_path)
    config = VAETrainingConfig(
        output_dir=str(workdir / "vae"),
        data=str(data_path),
        validation_fraction=0.0,
        seed=args.seed,
        max_train_steps=args.max_train_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_warmup_steps=min(100, args.max_train_steps // 10),
        weight_decay=0.01,
        checkpointing_steps=args.max_train_steps,
        checkpoints_total_limit=1,
        report_to="none",
        cpu=args.device == "cpu",
        mixed_precision=args.mixed_precision,
        model={
            "hidden_size": args.hidden_size,
            "num_latent_tokens": args.num_latent_tokens,
            "latent_dim": args.latent_dim,
            "encoder_layers": args.layers,
            "decoder_layers": args.layers,
            "value_encoding": args.value_encoding,
            "count_transform": args.count_transform,
            "thinning_min_fraction": args.thinning_min_fraction if args.thinning_min_fraction > 0 else None,
        },
    )
    start = time.perf_counter()
    model = train_vae(config)
    return model.eval(), time.perf_counter() - start


@torch.no_grad()
def reconstruct_ours(model: SCVAEModel, test: AnnData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out counts, NB means and inverse dispersions `[N, G]`, genes in the model's vocabulary order."""
    dataset, info = anndata_to_dataset(test, vocab=model.gene_vocab)
    loader = DataLoader(dataset, batch_size=256, collate_fn=CellCollator.from_corpus_info(info, covariates=[]))
    counts, means, inverse_dispersions = [], [], []
    for batch in loader:
        output = model(**{name: value.to(model.device) for name, value in batch.items()})
        counts.append(batch["panel_counts"].numpy())
        means.append(output.mean.float().cpu().numpy())
        inverse_dispersions.append(output.inverse_dispersion.expand_as(output.mean).float().cpu().numpy())
    return np.concatenate(counts), np.concatenate(means), np.concatenate(inverse_dispersions)


def train_scvi(train: AnnData, epochs: int, batch_size: int, seed: int):
    """scVI (NB likelihood, default architecture) on the training counts; returns the model and the wall time."""
    import scvi

    scvi.settings.seed = seed
    scvi.settings.verbosity = logging.ERROR
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    start = time.perf_counter()
    training = train.copy()
    scvi.model.SCVI.setup_anndata(training)
    model = scvi.model.SCVI(training, gene_likelihood="nb")
    model.train(max_epochs=epochs, batch_size=batch_size, train_size=1.0, accelerator="cpu",
                enable_progress_bar=False, logger=False, enable_checkpointing=False)
    return model, time.perf_counter() - start


@torch.no_grad()
def reconstruct_scvi(model, test: AnnData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out counts, NB means (posterior-mean latent, observed library) and inverse dispersions `[N, G]`."""
    counts = torch.as_tensor(sp.csr_matrix(test.X).toarray(), dtype=torch.float32)
    batch_index = torch.zeros(len(counts), 1, dtype=torch.long)
    module = model.module.eval()
    inference = module.inference(counts, batch_index=batch_index)
    likelihood = module.generative(inference["qz"].loc, library=inference["library"], batch_index=batch_index)["px"]
    return counts.numpy(), likelihood.mu.numpy(), likelihood.theta.expand_as(likelihood.mu).numpy()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    train, test = stratified_split(load_pbmc68k_counts(), args.seed)
    epochs = args.max_train_steps * args.batch_size / train.n_obs
    scvi_epochs = round(epochs) if args.scvi_epochs is None else args.scvi_epochs

    with tempfile.TemporaryDirectory() as workdir:
        ours, ours_seconds = train_ours(train, args, Path(workdir))
    rows = {
        f"scLDM VAE (ours, {ours.device.type})": (
            reconstruction_scores(*reconstruct_ours(ours, test)),
            epochs, ours_seconds, sum(p.numel() for p in ours.parameters()),
        ),
    }
    if scvi_epochs > 0:
        scvi_model, scvi_seconds = train_scvi(train, scvi_epochs, args.batch_size, args.seed)
        rows["scVI (cpu)"] = (
            reconstruction_scores(*reconstruct_scvi(scvi_model, test)),
            scvi_epochs, scvi_seconds, sum(p.numel() for p in scvi_model.module.parameters()),
        )
    print(f"\nPBMC68k ({train.n_obs} train / {test.n_obs} held-out cells, {train.n_vars} genes), "
          f"{args.threads} CPU thread(s), mixed precision {args.mixed_precision}, seed {args.seed}\n")
    print("| model | Pearson (per gene) | Pearson (per cell) | MSE | NB NLL / cell | epochs | train cells/s "
          "| wall time (s) | parameters |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (scores, model_epochs, seconds, parameters) in rows.items():
        print(f"| {name} | {scores['reconstruction_pearson']:.3f} | {scores['per_cell_pearson']:.3f} "
              f"| {scores['reconstruction_mse']:.4f} | {scores['nb_nll_per_cell']:.1f} | {model_epochs:.0f} "
              f"| {model_epochs * train.n_obs / seconds:.0f} | {seconds:.0f} | {parameters:,} |")


if __name__ == "__main__":
    main()
