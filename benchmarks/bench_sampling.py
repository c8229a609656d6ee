"""Sampling benchmark of SCLDMPipeline: throughput and quality against the number of ODE steps (Euler and Heun).

A pipeline is trained on the 700 bundled PBMC68k cells with `training/configs/pbmc_demo.yaml` (conditioned on
`cell_type`; reused from `--work-dir` when an earlier run saved it there). For every scheduler and step count it
generates `--num-cells` cells with the real cell-type composition and reports:

- cells/s of the whole pipeline call (ODE integration, VAE decoding, negative binomial counts);
- achieved FLOP/s (transformer + decoder FLOPs counted with `torch.utils.flop_counter.FlopCounterMode` on one batch,
  scaled to the run) as a fraction of this machine's float32 matmul peak, measured in the same run;
- latent error: `||z - z_ref|| / ||z_ref||` on `--num-latent-cells` cells, against 50-step Euler with the same noise;
- MMD^2 (scldm_hf.evaluation.mmd_rbf) between 2000 generated cells and the real cells in the 30-PC PCA of the real
  cells' log1p(CP10k) expression, and its change relative to 50-step Euler.

    python benchmarks/bench_sampling.py --threads 1
    python benchmarks/bench_sampling.py --device cuda   # peak and FLOP/s then refer to the GPU's float32 matmuls
"""

import argparse
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from scldm_hf.data import load_pbmc68k_counts
from scldm_hf.evaluation import fit_real_pca, log_normalize, mmd_rbf
from scldm_hf.workflows.side_by_side import train_scldm
from scldm_hf.loading import load_pipeline

RECIPE = Path(__file__).resolve().parents[1] / "training" / "configs" / "pbmc_demo.yaml"
LABEL_KEY = "cell_type"
SCHEDULERS = {"Euler": FlowMatchEulerDiscreteScheduler, "Heun": FlowMatchHeunDiscreteScheduler}
REFERENCE = ("Euler", 50)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="/tmp/scldm_bench_sampling", help="trained pipeline cache")
    parser.add_argument("--num-cells", type=int, default=10_000)
    parser.add_argument("--num-latent-cells", type=int, default=1000)
    parser.add_argument("--euler-steps", type=int, nargs="+", default=[5, 10, 25, 50])
    parser.add_argument("--heun-steps", type=int, nargs="+", default=[5, 10, 25])
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="!= 1 doubles the transformer calls")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the pipeline samples (e.g. cuda)")
    return parser.parse_args()


def trained_pipeline(work_dir: Path, real):
    pipeline_dir = work_dir / "pipeline"
    if not (pipeline_dir / "model_index.json").is_file():
        pipeline_dir = train_scldm(real, LABEL_KEY, RECIPE, work_dir, dit_overrides={"num_eval_cells": 0})
    pipe = load_pipeline(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """Best float32 FLOP/s of `size x size` matmuls on `device` (its practical peak; on CPU at the current thread
    count)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def one_batch(pipe, covariates: dict[str, torch.LongTensor], cells: int):
    """Random latents `[cells, T, D]`, the first `cells` covariates, a mid-flow timestep and library sizes `[cells]`,
    on the pipeline's device."""
    config, device = pipe.transformer.config, pipe.device
    latents = torch.randn(cells, config.num_latent_tokens, config.latent_dim, device=device)
    covariates = {name: ids[:cells].to(device) for name, ids in covariates.items()}
    return latents, covariates, torch.tensor(500.0, device=device), torch.full((cells,), 1000.0, device=device)


@torch.no_grad()
def flops_per_cell(pipe, covariates: dict[str, torch.LongTensor], guidance_scale: float, cells: int = 256):
    """(FLOPs of one guided velocity evaluation, FLOPs of decoding) per cell, counted on `cells` cells."""
    latents, covariates, timestep, library_size = one_batch(pipe, covariates, cells)
    with FlopCounterMode(display=False) as counter:
        pipe.predict_velocity(latents, timestep, covariates, guidance_scale)
    velocity_flops = counter.get_total_flops() / cells
    with FlopCounterMode(display=False) as counter:
        pipe.vae.decode(latents, library_size=library_size)
    return velocity_flops, counter.get_total_flops() / cells


@torch.no_grad()
def component_rates(pipe, covariates, guidance_scale, velocity_flops, decode_flops, cells: int) -> dict[str, float]:
    """GFLOP/s of one guided velocity evaluation and of `decode_counts` (decoding + NB counts), each timed alone."""
    latents, covariates, timestep, library_size = one_batch(pipe, covariates, cells)
    synchronize(pipe.device)
    start = time.perf_counter()
    pipe.predict_velocity(latents, timestep, covariates, guidance_scale)
    synchronize(pipe.device)
    velocity_seconds = time.perf_counter() - start
    start = time.perf_counter()
    pipe.decode_counts(latents, library_size)
    decode_seconds = time.perf_counter() - start
    return {
        "velocity GFLOP/s": cells * velocity_flops / velocity_seconds / 1e9,
        "decode + counts GFLOP/s": cells * decode_flops / decode_seconds / 1e9,
        "decode + counts s per 1k cells": 1000 * decode_seconds / cells,
    }


def number_of_function_evaluations(name: str, steps: int) -> int:
    """Transformer calls per cell: Euler one per step; diffusers' Heun two per step except the last."""
    return steps if name == "Euler" else 2 * steps - 1


def profile_one_batch(pipe, conditions, args) -> str:
    """Top operators (self CPU time; on a GPU self device time) of one pipeline call on one batch with 10 Euler
    steps."""
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    batch = {name: labels[: args.batch_size] for name, labels in conditions.items()}
    on_gpu = pipe.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * on_gpu) as profiler:
        pipe(conditions=batch, num_inference_steps=10, guidance_scale=args.guidance_scale,
             generator=torch.Generator().manual_seed(args.seed))
    sort_by = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=12)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    real = load_pbmc68k_counts()
    pipe = trained_pipeline(Path(args.work_dir), real).to(args.device)
    torch.set_num_threads(args.threads)  # scanpy calls during training reset torch's thread count
    scheduler_config = pipe.scheduler.config

    rng = np.random.default_rng(args.seed)
    labels = rng.choice(real.obs[LABEL_KEY].astype(str).to_numpy(), size=args.num_cells)
    conditions = {LABEL_KEY: list(labels)}
    covariates = pipe.conditioner.encode(conditions)
    real_log = log_normalize(real[:, list(pipe.vae.config.gene_names)].X)
    pca = fit_real_pca(real_log, seed=args.seed)
    real_pcs = pca.transform(real_log)
    scored_cells = rng.choice(args.num_cells, size=min(2000, args.num_cells), replace=False)

    peak_before = matmul_peak_flops(pipe.device)
    velocity_flops, decode_flops = flops_per_cell(pipe, covariates, args.guidance_scale)
    print(f"FLOPs per cell: {velocity_flops / 1e6:.2f} M per velocity evaluation, {decode_flops / 1e6:.2f} M decoding")
    rates = component_rates(pipe, covariates, args.guidance_scale, velocity_flops, decode_flops, args.batch_size)
    print("one batch alone: " + ", ".join(f"{name} {value:.3g}" for name, value in rates.items()))

    steps_of = {"Euler": args.euler_steps, "Heun": args.heun_steps}
    runs = [(name, steps) for name in SCHEDULERS for steps in steps_of[name]]
    runs.sort(key=lambda run: run != REFERENCE)
    rows, reference = [], {}
    for name, steps in runs:
        pipe.scheduler = SCHEDULERS[name].from_config(scheduler_config)
        kwargs = {"num_inference_steps": steps, "guidance_scale": args.guidance_scale}
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(args.seed)
        cells = pipe(conditions=conditions, batch_size=args.batch_size, generator=generator, **kwargs).cells
        seconds = time.perf_counter() - start
        latent_conditions = {LABEL_KEY: conditions[LABEL_KEY][: args.num_latent_cells]}
        latents = pipe(conditions=latent_conditions, output_type="latent",
                       generator=torch.Generator().manual_seed(args.seed), **kwargs).cells
        mmd = mmd_rbf(real_pcs, pca.transform(log_normalize(cells.X[scored_cells])))
        if (name, steps) == REFERENCE:
            reference = {"latents": latents, "mmd": mmd}
        nfe = number_of_function_evaluations(name, steps)
        flops = args.num_cells * (nfe * velocity_flops + decode_flops)
        rows.append({
            "scheduler": name, "steps": steps, "NFE": nfe, "seconds": seconds, "cells/s": args.num_cells / seconds,
            "GFLOP/s": flops / seconds / 1e9,
            "latent err": float((latents - reference["latents"]).norm() / reference["latents"].norm()),
            "MMD^2": mmd, "MMD^2 vs ref (%)": 100 * (mmd - reference["mmd"]) / reference["mmd"],
        })
        print(f"{name} {steps} steps: {seconds:.1f} s", flush=True)

    # the machine is shared: the best of two peak measurements is the least disturbed one
    peak = max(peak_before, matmul_peak_flops(pipe.device))
    print(f"float32 matmul peak on {pipe.device}: {peak / 1e9:.1f} GFLOP/s ({args.threads} CPU threads; best of "
          "before and after the runs)")
    for row in rows:
        row["% of peak"] = 100 * row["GFLOP/s"] * 1e9 / peak
    header = list(rows[0])
    print(f"\n{args.num_cells} cells on {pipe.device}, guidance {args.guidance_scale}, batch {args.batch_size}, "
          f"{args.threads} CPU threads; "
          f"reference: {REFERENCE[0]} {REFERENCE[1]} steps\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in sorted(rows, key=lambda row: (row["scheduler"], row["steps"])):
        cells = [f"{value:.3g}" if isinstance(value, float) else str(value) for value in row.values()]
        print("| " + " | ".join(cells) + " |")
    print("\nWhere the time goes (one batch, 10 Euler steps, decoding and counts included):\n")
    print(profile_one_batch(pipe, conditions, args))


if __name__ == "__main__":
    main()
