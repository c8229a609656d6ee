"""VAE training throughput on CPU: s/step, FLOP/step, % of the matmul peak and page faults, with scVI alongside.

For the demo recipe's VAE (`training/configs/pbmc_demo.yaml`) and the scLDM-base-scale VAE (128 x 16 latent, width
128, 2 + 2 self-attention blocks) at G genes, one training step (forward, backward, AdamW) on a batch of 64 synthetic
cells (gamma-Poisson counts, ~10 % of genes expressed; timing does not depend on the values) is timed after one
warm-up step; s/step is the median of `--steps` steps. FLOP/step is counted by
`torch.utils.flop_counter.FlopCounterMode` on one step (work recomputed by checkpointing counts: it is done); the peak
is the best float32 (and bf16) 2048 x 2048 matmul in the same process. Page faults are minor faults
(`resource.getrusage`) per step. `--mixed-precision no bf16` also times each step under CPU bf16 autocast (as
`mixed_precision: bf16` trains; float32 weights). scVI (library defaults, NB likelihood) trains on the same cells in the same run; its
cells/s is cells times epochs over the wall time of `SCVI.train`.

    python benchmarks/bench_training.py            # G in {765, 2000, 7000}, both VAEs, scVI
    python benchmarks/bench_training.py --quick    # G = 765 only, 3 steps, bf16 peak at 512^2
    python benchmarks/bench_training.py --recipes "demo recipe" --genes 2000 7000
    python benchmarks/bench_training.py --mixed-precision no bf16 --steps 2   # float32 and bf16 autocast steps
    python benchmarks/bench_training.py --keep-freed-memory   # the allocator setting training applies on CPU
"""

import argparse
import logging
import resource
import statistics
import sys
import time
import warnings

import numpy as np
import torch
from anndata import AnnData
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from scldm_hf.data import CellCollator
from scldm_hf.flow_matching import flow_matching_loss
from scldm_hf.models import SCVAEConfig, SCVAEModel
from scldm_hf.models.transformer_latent_dit import LatentDiTTransformer
from scldm_hf.training.allocator import keep_freed_memory

RECIPES = {
    "demo recipe": {"hidden_size": 32, "num_latent_tokens": 8, "latent_dim": 16, "encoder_layers": 1,
                    "decoder_layers": 1, "num_attention_heads": 4},
    "scLDM base": {"hidden_size": 128, "num_latent_tokens": 128, "latent_dim": 16, "encoder_layers": 2,
                   "decoder_layers": 2, "num_attention_heads": 8},
}

# the DiT of training/configs/pbmc_demo.yaml
DIT_OPTIONS = {"hidden_size": 128, "num_layers": 4, "num_attention_heads": 4, "timestep_embedding_dim": 128}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genes", type=int, nargs="+", default=[765, 2000, 7000])
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model (median), after one warm-up step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mixed-precision", nargs="+", choices=["no", "bf16"], default=["no"],
                        help="precision(s) of the step: float32, or bf16 autocast with float32 weights")
    parser.add_argument("--scvi-epochs", type=int, default=5, help="0 skips scVI")
    parser.add_argument("--bf16-peak-size", type=int, default=2048,
                        help="matrix size of the bf16 peak (smaller where the CPU has no bf16 instructions: slow)")
    parser.add_argument("--quick", action="store_true", help="G = 765 only, 3 steps, 2 scVI epochs, 512^2 bf16 peak")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="apply scldm_hf.training.allocator.keep_freed_memory first (training does, on CPU)")
    parser.add_argument("--stage2", action="store_true",
                        help="also print stage 2's costs: VAE encoding cells/s (the latent cache) and DiT steps")
    args = parser.parse_args()
    if args.quick:
        args.genes, args.steps, args.scvi_epochs, args.bf16_peak_size = [765], 3, 2, 512
    return args


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a `[size, size] @ [size, size]` matmul in `dtype`."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def synthetic_counts(num_cells: int, num_genes: int, generator: np.random.Generator) -> np.ndarray:
    """`[cells, genes]` gamma-Poisson counts with ~10 % of the genes expressed in each cell."""
    expressed = generator.random((num_cells, num_genes)) < 0.1
    rate = generator.gamma(0.5, 4.0, size=(num_cells, num_genes))
    return (generator.poisson(rate) + 1) * expressed


def collate(counts: np.ndarray) -> dict:
    """A `CellCollator` batch of dense `counts [B, G]` (gene `j` has vocabulary id `j + 1`)."""
    rows = []
    for cell in counts:
        expressed = np.flatnonzero(cell)
        rows.append({"gene_ids": expressed + 1, "counts": cell[expressed], "library_size": cell.sum()})
    return CellCollator(np.arange(1, counts.shape[1] + 1))(rows)


def time_vae(model_options: dict, batch: dict, steps: int, mixed_precision: str = "no") -> dict:
    """`time_training` of the VAE on `batch`, plus its encoding throughput (eval, no grad; what stage 2 does once
    per training cell)."""
    num_genes = batch["panel_counts"].shape[1]
    torch.manual_seed(0)
    model = SCVAEModel(SCVAEConfig(gene_names=[f"g{i}" for i in range(num_genes)], **model_options))
    result = time_training(model, lambda: model(**batch).loss, steps, mixed_precision)
    inputs = {name: batch[name] for name in ("gene_ids", "counts", "attention_mask", "library_size")}
    with torch.no_grad():
        model.eval().encode(**inputs)
        result["encode_cells_per_second"] = len(batch["library_size"]) / _seconds(lambda: model.encode(**inputs))
    return result


def time_dit(num_latent_tokens: int, latent_dim: int, batch_size: int, steps: int) -> dict:
    """`time_training` of the demo recipe's DiT (`DIT_OPTIONS`) on a batch of `batch_size` latents `[T, D]` with a
    10-label covariate; its cost does not depend on the number of genes."""
    torch.manual_seed(0)
    transformer = LatentDiTTransformer(num_latent_tokens=num_latent_tokens, latent_dim=latent_dim,
                                       covariate_num_labels={"cell_type": 10}, **DIT_OPTIONS)
    latents = torch.randn(batch_size, num_latent_tokens, latent_dim)
    covariates = {"cell_type": torch.randint(0, 10, (batch_size,))}
    return time_training(transformer, lambda: flow_matching_loss(transformer, latents, covariates), steps)


def time_training(model: torch.nn.Module, loss, steps: int, mixed_precision: str = "no") -> dict:
    """Median s/step, FLOP/step and minor page faults/step of AdamW steps on `loss()` (a scalar of `model`), under
    CPU bf16 autocast with ``mixed_precision="bf16"``, after one warm-up step."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
            value = loss()
        value.backward()
        optimizer.step()

    step()
    seconds, faults = [], []
    for _ in range(steps):
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds.append(_seconds(step))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    with FlopCounterMode(display=False) as counter:
        step()
    return {"seconds": statistics.median(seconds), "flops": counter.get_total_flops(),
            "faults": statistics.median(faults)}


def scvi_cells_per_second(counts: np.ndarray, epochs: int, batch_size: int, seed: int) -> float:
    """scVI (defaults, NB likelihood) training throughput on `counts [cells, genes]`."""
    import scvi

    scvi.settings.seed = seed
    scvi.settings.verbosity = logging.ERROR
    adata = AnnData(counts.astype(np.float32))
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata, gene_likelihood="nb")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seconds = _seconds(lambda: model.train(
            max_epochs=epochs, batch_size=batch_size, train_size=1.0, accelerator="cpu", enable_progress_bar=False
        ))
    return len(counts) * epochs / seconds


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        print(f"keep_freed_memory applied: {keep_freed_memory() or 'none (not glibc, or set in the environment)'}")
    peak = {"float32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16, args.bf16_peak_size)}
    generator = np.random.default_rng(args.seed)
    print(f"matmul peak ({args.threads} thread(s)): float32 (2048^2) {peak['float32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 ({args.bf16_peak_size}^2) {peak['bf16'] / 1e9:.1f} GFLOP/s\n")
    print("| VAE | precision | G | s/step (batch 64) | cells/s | GFLOP/step | % of float32 peak | % of bf16 peak "
          "| page faults/step | scVI cells/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    encoding = {}
    for num_genes in args.genes:
        counts = synthetic_counts(10 * args.batch_size, num_genes, generator)
        batch = collate(counts[: args.batch_size])
        runs = [(name, precision) for name in args.recipes for precision in args.mixed_precision]
        results = {run: time_vae(RECIPES[run[0]], batch, args.steps, run[1])
                   for run in tqdm(runs, desc=f"VAEs at G = {num_genes}", file=sys.stderr)}
        scvi_speed = (
            f"{scvi_cells_per_second(counts, args.scvi_epochs, args.batch_size, args.seed):.0f}"
            if args.scvi_epochs > 0 else "–"
        )
        for (name, precision), result in results.items():
            achieved = result["flops"] / result["seconds"]
            print(f"| {name} | {precision} | {num_genes:,} | {result['seconds']:.3f} | {args.batch_size / result['seconds']:.0f} "
                  f"| {result['flops'] / 1e9:.1f} | {100 * achieved / peak['float32']:.0f} "
                  f"| {100 * achieved / peak['bf16']:.0f} | {result['faults']:,.0f} | {scvi_speed} |", flush=True)
        encoding.update({(name, num_genes): result["encode_cells_per_second"]
                         for (name, precision), result in results.items() if precision == "no"})
    if args.stage2:
        print_stage2(encoding, args.batch_size, args.steps)


def print_stage2(encoding: dict[tuple[str, int], float], batch_size: int, steps: int) -> None:
    """Stage 2's two costs: encoding every training cell once (cells/s per VAE and G) and the DiT steps (per latent
    shape; independent of G and of the number of cells)."""
    print("\n| stage 2 | VAE | G | s per batch | cells/s |\n|---|---|---|---|---|")
    for (name, num_genes), cells_per_second in encoding.items():
        print(f"| encode (latent cache) | {name} | {num_genes:,} | {batch_size / cells_per_second:.3f} "
              f"| {cells_per_second:.0f} |")
    for name in dict.fromkeys(name for name, _ in encoding):
        result = time_dit(RECIPES[name]["num_latent_tokens"], RECIPES[name]["latent_dim"], batch_size, steps)
        print(f"| DiT training step (demo DiT) | {name} latents | any | {result['seconds']:.3f} "
              f"| {batch_size / result['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
