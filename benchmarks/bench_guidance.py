"""Sampling settings of generation, chosen on validation cells: guidance scale x Euler steps of trained pipelines.

For each trained scLDM pipeline of a `bench_diagnosis.py` workdir (``WORKDIR/<dataset>/seed<k>/{pipeline,train.h5ad}``),
the cells scored are the pipeline's own validation cells: the ``validation_fraction`` of the training cells that both
stages held out (the same seeded split of the same corpus), which neither the VAE nor the DiT trained on. For every
guidance scale and step count the pipeline generates `GENERATED_PER_CELL` cells per validation cell, for its labels,
scored by `evaluate_generation` against them (PCA fitted on the other training cells), for three sampling seeds.
Neither the diagnosis' floor nor its test cells are read, so sampling settings can be chosen on this table.

    python benchmarks/bench_guidance.py --workdir /work/diag --datasets kang2018 --seeds 0 1 2 --guidance 1 1.5 2 --steps 25 50
"""

import argparse
import itertools
from pathlib import Path

import anndata as ad
import numpy as np
import torch
import yaml
from bench_generation import DATASETS
from bench_library_size import mean_sd

from scldm_hf.data.corpus import SHARD_GLOB, open_arrow_shards
from scldm_hf.evaluation import evaluate_generation
from scldm_hf.loading import load_pipeline
from scldm_hf.training.data import LATENT_CACHE_DIR, split_train_validation
from scldm_hf.training.hub import TRAINING_CONFIG_FILE

GENERATED_PER_CELL = 4
SAMPLING_SEEDS = (0, 1, 2)
METRICS = ("mmd_rbf", "energy_distance", "nn_accuracy", "classifier_auroc")


def validation_cell_ids(pipeline_dir: Path) -> set[str]:
    """The `cell_id`s of the pipeline's validation rows (its latent cache split as its training split it)."""
    recipe = yaml.safe_load((pipeline_dir / TRAINING_CONFIG_FILE).read_text())
    cache = open_arrow_shards(sorted((pipeline_dir / LATENT_CACHE_DIR).glob(SHARD_GLOB)))
    validation = split_train_validation(cache, recipe["validation_fraction"], recipe["seed"])[1]
    return set(validation["cell_id"])


def score_pipeline(pipeline_dir: Path, train: ad.AnnData, settings) -> dict[tuple, dict[str, float]]:
    """`{(guidance, steps): {metric: mean over sampling seeds}}` of one trained pipeline on its validation cells."""
    pipe = load_pipeline(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    covariates = pipe.conditioner.covariate_names
    held_out = train.obs_names.isin(list(validation_cell_ids(pipeline_dir)))
    real, reference = train[held_out].copy(), train[~held_out].copy()
    conditions = real.obs[covariates].astype(str).loc[real.obs.index.repeat(GENERATED_PER_CELL)].reset_index(drop=True)
    scores = {}
    for guidance, steps in settings:
        per_seed = {metric: [] for metric in METRICS}
        for sampling_seed in SAMPLING_SEEDS:
            cells = pipe(conditions=conditions, guidance_scale=guidance, num_inference_steps=steps,
                         generator=torch.Generator().manual_seed(sampling_seed)).cells
            mean = evaluate_generation(real, cells, covariates, reference=reference, seed=sampling_seed).loc["mean"]
            for metric in METRICS:
                per_seed[metric].append(float(mean[metric]))
        scores[guidance, steps] = {metric: float(np.mean(values)) for metric, values in per_seed.items()}
        print(f"  guidance {guidance} steps {steps}: " + ", ".join(
            f"{metric} {value:.4f}" for metric, value in scores[guidance, steps].items()), flush=True)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a bench_diagnosis.py --workdir")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = list(itertools.product(args.guidance, args.steps))
    for name in args.datasets:
        per_seed = []
        for seed in args.seeds:
            folder = args.workdir / name / f"seed{seed}"
            print(f"{name} seed {seed}", flush=True)
            per_seed.append(score_pipeline(folder / "pipeline", ad.read_h5ad(folder / "train.h5ad"), settings))
        num_cells = len(validation_cell_ids(args.workdir / name / f"seed{args.seeds[0]}" / "pipeline"))
        lines = ["| guidance | steps | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
        for setting in settings:
            lines.append(f"| {setting[0]:g} | {setting[1]} | " + " | ".join(
                mean_sd([scores[setting][metric] for scores in per_seed]) for metric in METRICS) + " |")
        print(f"\n### {name}: validation cells of each pipeline ({num_cells} at seed {args.seeds[0]}), seeds "
              f"{args.seeds}, {GENERATED_PER_CELL} generated per cell, mean over sampling seeds "
              f"{list(SAMPLING_SEEDS)}\n\n" + "\n".join(lines) + "\n", flush=True)


if __name__ == "__main__":
    main()
