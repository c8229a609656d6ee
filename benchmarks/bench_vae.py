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

Precision comparison: ``--mixed-precision no bf16 --seeds 0 1 2`` trains ours once per precision and seed (same
split, ``--split-seed``) and adds a summary: mean +- sd over seeds of each score and of s/step, and whether the bf16
minus float32 difference of the means is within seed noise (|difference| <= 2 standard errors of the difference).
``--recipe`` takes the VAE (architecture, learning rate, warm-up, weight decay, steps) from a recipe's ``vae`` section:

    python benchmarks/bench_vae.py --recipe training/configs/pbmc_demo.yaml --mixed-precision no bf16 --seeds 0 1 2 --scvi-epochs 0
"""

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from accelerate.state import AcceleratorState
from anndata import AnnData
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader

from scldm_hf.data import CellCollator, anndata_to_dataset, load_pbmc68k_counts
from scldm_hf.evaluation import reconstruction_metrics
from scldm_hf.evaluation.genes import columnwise_pearson
from scldm_hf.evaluation.preprocessing import log_normalize
from scldm_hf.models import SCVAEModel
from scldm_hf.training.config import VAETrainingConfig, load_config
from scldm_hf.training.vae import train_vae


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (one run of ours per seed)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the 80/20 train/held-out split")
    parser.add_argument("--recipe", default=None,
                        help="a recipe YAML whose vae section sets our VAE and its optimisation (the model options, "
                             "learning rate and batch size below are then ignored; --max-train-steps overrides)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both models")
    parser.add_argument("--device", choices=["cpu", "auto"], default="cpu",
                        help="where our VAE trains: the CPU, or an accelerator when one is present (scVI: always CPU)")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], nargs="+", default=["no"],
                        help="autocast precision(s) of our VAE (Accelerate's mixed_precision); several are compared")
    parser.add_argument("--max-train-steps", type=int, default=None, help="default: the recipe's, else 1000")
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


def ours_config(args: argparse.Namespace, data_path: Path, output_dir: Path, seed: int,
                mixed_precision: str) -> VAETrainingConfig:
    """The `VAETrainingConfig` of one run of ours: `args.recipe`'s vae section, or the command line's model."""
    run = {
        "output_dir": str(output_dir),
        "data": str(data_path),
        "covariates": [],
        "validation_fraction": 0.0,
        "early_stopping_patience": None,
        "seed": seed,
        "checkpoints_total_limit": 1,
        "report_to": "none",
        "cpu": args.device == "cpu",
        "mixed_precision": mixed_precision,
    }
    if args.recipe is not None:
        recipe = load_config(VAETrainingConfig, args.recipe, section="vae")
        steps = recipe.max_train_steps if args.max_train_steps is None else args.max_train_steps
        schedule = {"max_train_steps": steps, "checkpointing_steps": steps,
                    "lr_warmup_steps": min(recipe.lr_warmup_steps, steps)}
        return load_config(VAETrainingConfig, args.recipe, run | schedule, section="vae")
    steps = args.max_train_steps or 1000
    return VAETrainingConfig(
        **run,
        max_train_steps=steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_warmup_steps=min(100, steps // 10),
        weight_decay=0.01,
        checkpointing_steps=steps,
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


def train_ours(config: VAETrainingConfig, train: AnnData) -> tuple[SCVAEModel, float]:
    """Train our VAE on `train` (written to ``config.data``) with the package's training loop (`train_vae`); returns
    the model and the wall time."""
    train.write_h5ad(config.data)
    AcceleratorState._reset_state()  # Accelerate keeps one mixed precision per process; each run sets its own
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


SUMMARY_SCORES = {"reconstruction_pearson": "Pearson (per gene)", "per_cell_pearson": "Pearson (per cell)",
                  "nb_nll_per_cell": "NB NLL / cell", "seconds_per_step": "s/step"}


def precision_summary(runs: dict[str, list[dict[str, float]]]) -> list[str]:
    """Markdown rows: per precision, mean +- sd over seeds of `SUMMARY_SCORES`; then each precision minus the first,
    with whether the difference of means is within seed noise (<= 2 standard errors of the difference)."""
    rows = [f"| {precision} | {len(scores)} | " + " | ".join(
        f"{statistics.mean(s[key] for s in scores):.4f} ± {statistics.stdev(s[key] for s in scores):.4f}"
        for key in SUMMARY_SCORES) + " |" for precision, scores in runs.items()]
    reference_name, reference = next(iter(runs.items()))
    for precision, scores in list(runs.items())[1:]:
        cells = []
        for key in SUMMARY_SCORES:
            difference = statistics.mean(s[key] for s in scores) - statistics.mean(s[key] for s in reference)
            standard_error = (statistics.variance(s[key] for s in scores) / len(scores)
                              + statistics.variance(s[key] for s in reference) / len(reference)) ** 0.5
            verdict = "within noise" if abs(difference) <= 2 * standard_error else "beyond noise"
            cells.append(f"{difference:+.4f} (2 SE {2 * standard_error:.4f}: {verdict})")
        rows.append(f"| {precision} − {reference_name} | | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    train, test = stratified_split(load_pbmc68k_counts(), args.split_seed)

    rows, runs = [], {}
    with tempfile.TemporaryDirectory() as workdir:
        for precision in args.mixed_precision:
            for seed in args.seeds:
                run_dir = Path(workdir) / f"{precision}-{seed}"
                config = ours_config(args, run_dir / "train.h5ad", run_dir / "vae", seed, precision)
                run_dir.mkdir()
                ours, seconds = train_ours(config, train)
                scores = reconstruction_scores(*reconstruct_ours(ours, test))
                scores["seconds_per_step"] = seconds / config.max_train_steps
                runs.setdefault(precision, []).append(scores)
                epochs = config.max_train_steps * config.batch_size / train.n_obs
                rows.append((f"scLDM VAE (ours, {ours.device.type}, {precision})", seed, scores, epochs, seconds,
                             sum(p.numel() for p in ours.parameters())))
    scvi_epochs = round(rows[0][3]) if args.scvi_epochs is None else args.scvi_epochs
    if scvi_epochs > 0:
        for seed in args.seeds:
            scvi_model, scvi_seconds = train_scvi(train, scvi_epochs, config.batch_size, seed)
            rows.append(("scVI (cpu)", seed, reconstruction_scores(*reconstruct_scvi(scvi_model, test)), scvi_epochs,
                         scvi_seconds, sum(p.numel() for p in scvi_model.module.parameters())))
    print(f"\nPBMC68k ({train.n_obs} train / {test.n_obs} held-out cells, {train.n_vars} genes, split seed "
          f"{args.split_seed}), {args.threads} CPU thread(s), our VAE: {args.recipe or 'command-line model'}, "
          f"{config.max_train_steps} steps of {config.batch_size} cells\n")
    print("| model | seed | Pearson (per gene) | Pearson (per cell) | MSE | NB NLL / cell | epochs | train cells/s "
          "| wall time (s) | parameters |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, seed, scores, model_epochs, seconds, parameters in rows:
        print(f"| {name} | {seed} | {scores['reconstruction_pearson']:.3f} | {scores['per_cell_pearson']:.3f} "
              f"| {scores['reconstruction_mse']:.4f} | {scores['nb_nll_per_cell']:.1f} | {model_epochs:.0f} "
              f"| {model_epochs * train.n_obs / seconds:.0f} | {seconds:.0f} | {parameters:,} |")
    if len(args.seeds) > 1:
        print("\nOurs, mean ± sd over seeds (s/step: wall time of the training call over its steps)\n")
        print("| precision | seeds | " + " | ".join(SUMMARY_SCORES.values()) + " |")
        print("|---|---|" + "---|" * len(SUMMARY_SCORES))
        print("\n".join(precision_summary(runs)))


if __name__ == "__main__":
    main()
