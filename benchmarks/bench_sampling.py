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

With `--couplings`, it instead measures how training couplings (`DiTTrainingConfig.coupling`) change quality against
Euler steps on `--dataset` (PBMC68k by default; Kang 2018 and celltypist are cut to the 2,000 most variable genes of
their train cells, as in `bench_generation.py`). The cells are split 50/15/15/20 (stratified, seed 0) into train / validation / floor / test; one demo VAE
is trained on the train cells, then the demo DiT once per coupling and seed (same VAE and latents). Each pipeline
generates the validation and the test cells' cell-type composition, scored by `evaluate_generation` (PCA fitted on
the train cells, the floor cells as the real floor). The scheduler `shift` of the few-step rows is chosen per coupling
on the validation split (least mean `--shift-steps` gap to 50 steps); the test split is scored only at shift 1 and at
that choice.

    python benchmarks/bench_sampling.py --threads 1 --couplings independent minibatch_ot --seeds 0 1 2
    python benchmarks/bench_sampling.py --threads 1 --couplings independent minibatch_ot_by_label --dataset kang2018
"""

import argparse
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_generation import DATASETS, load_dataset, variable_genes_of_training_cells
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from scldm_hf.data import load_pbmc68k_counts
from scldm_hf.evaluation import evaluate_generation, fit_real_pca, log_normalize, mmd_rbf
from scldm_hf.flow_matching import COUPLINGS
from scldm_hf.loading import load_pipeline
from scldm_hf.workflows.side_by_side import stratified_split, train_scldm

RECIPE = Path(__file__).resolve().parents[1] / "training" / "configs" / "pbmc_demo.yaml"
LABEL_KEY = "cell_type"
SCHEDULERS = {"Euler": FlowMatchEulerDiscreteScheduler, "Heun": FlowMatchHeunDiscreteScheduler}
REFERENCE = ("Euler", 50)
# train / validation / floor / test of the coupling study
STUDY_SPLIT = (0.5, 0.15, 0.15, 0.2)


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
    study = parser.add_argument_group("coupling study (--couplings)")
    study.add_argument("--couplings", nargs="+", choices=COUPLINGS, help="train and compare these couplings")
    study.add_argument("--dataset", choices=DATASETS, default="pbmc68k", help="the cells of the study")
    study.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="DiT training and sampling seeds")
    study.add_argument("--study-steps", type=int, nargs="+", default=[1, 2, 5, 10, 25, 50])
    study.add_argument("--shifts", type=float, nargs="+", default=[0.5, 1.0, 2.0, 3.0],
                       help="scheduler shifts tried on the validation split")
    study.add_argument("--shift-steps", type=int, nargs="+", default=[2, 5], help="steps the shifts are tried at")
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


def study_pipeline(train, label_key: str, coupling: str, seed: int, work_dir: Path) -> tuple[Path, float]:
    """The demo DiT trained with `coupling` and `seed` on the shared demo VAE of `train` (kept in
    ``work_dir/<coupling>_seed<seed>``), and its training wall time (0 when reused)."""
    pipeline_dir = work_dir / f"{coupling}_seed{seed}"
    if (pipeline_dir / "model_index.json").is_file():
        return pipeline_dir, 0.0
    start = time.perf_counter()
    shutil.rmtree(work_dir / "pipeline", ignore_errors=True)  # an interrupted run's checkpoints
    trained = train_scldm(train, label_key, RECIPE, work_dir, reuse_vae=True,
                          dit_overrides={"num_eval_cells": 0, "seed": seed, "coupling": coupling})
    shutil.move(trained, pipeline_dir)
    return pipeline_dir, time.perf_counter() - start


def study_scores(pipe, real, train, floor, label_key: str, seed: int, runs: list[tuple[int, float]]) -> list[dict]:
    """MMD^2 (and its real floor) of `pipe`'s cells with `real`'s labels, for each ``(steps, shift)`` of `runs`;
    every run starts from the same noise."""
    conditions = {label_key: list(real.obs[label_key].astype(str))}
    rows = []
    for steps, shift in runs:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift)
        generator = torch.Generator().manual_seed(seed)
        cells = pipe(conditions=conditions, num_inference_steps=steps, generator=generator).cells
        scores = evaluate_generation(real, cells, label_key, reference=train, real_floor=floor, seed=seed).loc["mean"]
        rows.append({"steps": steps, "shift": shift, "mmd": scores["mmd_rbf"], "floor": scores["mmd_rbf_real_floor"]})
    return rows


def with_gaps(rows: list[dict]) -> list[dict]:
    """`rows` of one pipeline and split with ``gap``: % MMD^2 above its 50-step shift-1 row."""
    reference = next(row["mmd"] for row in rows if (row["steps"], row["shift"]) == (50, 1.0))
    return [row | {"gap": 100 * (row["mmd"] - reference) / reference} for row in rows]


def mean_sd(values) -> str:
    return f"{np.mean(values):.4g} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.2g}"


def print_study_table(title: str, rows: list[dict], keys: list[tuple]) -> None:
    """Markdown table of MMD^2, gap and floor (mean ± sd over seeds) per ``(coupling, steps, shift)`` of `keys`."""
    print(f"\n{title}\n")
    print("| coupling | steps | shift | MMD^2 | gap to 50 steps (%) | real floor MMD^2 | seeds |")
    print("|---|---|---|---|---|---|---|")
    for coupling, steps, shift in keys:
        cell = [row for row in rows if (row["coupling"], row["steps"], row["shift"]) == (coupling, steps, shift)]
        print(f"| {coupling} | {steps} | {shift:g} | {mean_sd([row['mmd'] for row in cell])} | "
              f"{mean_sd([row['gap'] for row in cell])} | {mean_sd([row['floor'] for row in cell])} | {len(cell)} |")


def coupling_study(args) -> None:
    """Train one demo pipeline per coupling and seed; print validation (shift choice) and test tables."""
    start = time.perf_counter()
    work_dir = Path(args.work_dir) / "couplings" / args.dataset
    cells, label_key = load_dataset(args.dataset)
    train, validation, floor, test = variable_genes_of_training_cells(
        stratified_split(cells, label_key, STUDY_SPLIT, seed=0))
    print(f"cells: {train.n_obs} train, {validation.n_obs} validation, {floor.n_obs} floor, {test.n_obs} test")
    validation_runs = [(50, 1.0)] + [(steps, shift) for steps in args.shift_steps for shift in args.shifts]
    pipelines, validation_rows = {}, []
    for seed in args.seeds:
        for coupling in args.couplings:
            pipelines[coupling, seed], seconds = study_pipeline(train, label_key, coupling, seed, work_dir)
            torch.set_num_threads(args.threads)  # scanpy calls during training reset torch's thread count
            pipe = load_pipeline(pipelines[coupling, seed])
            pipe.set_progress_bar_config(disable=True)
            rows = with_gaps(study_scores(pipe, validation, train, floor, label_key, seed, validation_runs))
            validation_rows += [row | {"coupling": coupling, "seed": seed} for row in rows]
            print(f"{coupling} seed {seed}: DiT trained in {seconds:.0f} s, validation scored", flush=True)
    shift_keys = [(coupling, steps, shift) for coupling in args.couplings for steps in args.shift_steps
                  for shift in args.shifts]
    print_study_table("Validation split: scheduler shift at few steps", validation_rows, shift_keys)
    chosen = {coupling: min(args.shifts, key=lambda shift: np.mean([
        row["gap"] for row in validation_rows
        if (row["coupling"], row["steps"], row["shift"]) == (coupling, max(args.shift_steps), shift)]))
        for coupling in args.couplings}
    print(f"\nshift chosen on validation ({max(args.shift_steps)} steps): {chosen}")

    test_rows = []
    for (coupling, seed), pipeline_dir in pipelines.items():
        pipe = load_pipeline(pipeline_dir)
        pipe.set_progress_bar_config(disable=True)
        runs = [(steps, 1.0) for steps in args.study_steps]
        if chosen[coupling] != 1.0:
            runs += [(steps, chosen[coupling]) for steps in args.study_steps if steps < 50]
        rows = with_gaps(study_scores(pipe, test, train, floor, label_key, seed, runs))
        test_rows += [row | {"coupling": coupling, "seed": seed} for row in rows]
    test_keys = sorted({(row["coupling"], row["steps"], row["shift"]) for row in test_rows},
                       key=lambda key: (args.couplings.index(key[0]), key[2], key[1]))
    print_study_table(f"Test split ({test.n_obs} cells): Euler steps, gap to the same pipeline's 50 steps (shift 1)",
                      test_rows, test_keys)
    (work_dir / "results.json").write_text(json.dumps({"validation": validation_rows, "test": test_rows}, indent=1))
    print(f"\nwall time {time.perf_counter() - start:.0f} s, {args.threads} torch thread(s)")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    if args.couplings:
        return coupling_study(args)
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
