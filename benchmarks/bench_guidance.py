"""Sampling settings of generation, chosen on validation cells: guidance scale x steps x sampler of trained pipelines.

For each trained scLDM pipeline of a `bench_diagnosis.py` workdir (``WORKDIR/<dataset>/seed<k>/{pipeline,train.h5ad}``),
the cells scored are the pipeline's own validation cells: the ``validation_fraction`` of the training cells that both
stages held out (the same seeded split of the same corpus), which neither the VAE nor the DiT trained on. For every
guidance scale and step count the pipeline generates `GENERATED_PER_CELL` cells per validation cell, for its labels,
scored by `evaluate_generation` against them (PCA fitted on the other training cells), for three sampling seeds;
and one latent per validation cell is generated and compared with the encoded cells per label in the VAE's
standardised latent space (MMD², energy: the DiT and sampler alone, without the decoder's count noise), the training
cells' latents beside it. Samplers: Euler (the pipelines' own), Heun, or adaptive dopri5 (the released scLDM's).
Neither the diagnosis' floor nor its test cells are read, so sampling settings can be chosen on this table.

    python benchmarks/bench_guidance.py --workdir /work/diag --datasets kang2018 --seeds 0 1 2 --guidance 1 1.5 2 --steps 25 50
    python benchmarks/bench_guidance.py --workdir /work/diag --guidance 1 --steps 25 100 --schedulers euler dopri5
"""

import itertools
from pathlib import Path

import anndata as ad
import numpy as np
import torch
import yaml
from bench_diagnosis import latent_scores, workdir_argument_parser
from bench_library_size import mean_sd
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from scldm_hf.data.corpus import SHARD_GLOB, open_arrow_shards
from scldm_hf.evaluation import evaluate_generation
from scldm_hf.loading import load_pipeline
from scldm_hf.pipelines import FlowMatchODESolverScheduler
from scldm_hf.training.data import LATENT_CACHE_DIR, split_train_validation
from scldm_hf.training.hub import TRAINING_CONFIG_FILE

GENERATED_PER_CELL = 4
SAMPLING_SEEDS = (0, 1, 2)
METRICS = ("mmd_rbf", "energy_distance", "nn_accuracy", "classifier_auroc")
SCHEDULERS = ("euler", "heun", "dopri5")
LATENT_METRICS = ("MMD²", "energy")
SCORE_COLUMNS = (*(f"latent {metric}" for metric in LATENT_METRICS), *METRICS)  # of `score_pipeline`'s tables


def scheduler_named(name: str, config):
    """The sampler `name` for a pipeline whose scheduler has `config`: diffusers' Euler or Heun flow-matching
    scheduler, or adaptive dopri5 (`FlowMatchODESolverScheduler`, the released scLDM's sampler)."""
    if name == "dopri5":
        return FlowMatchODESolverScheduler(num_train_timesteps=config.num_train_timesteps)
    return {"euler": FlowMatchEulerDiscreteScheduler, "heun": FlowMatchHeunDiscreteScheduler}[name].from_config(config)


def latent_cache_split(pipeline_dir: Path):
    """The pipeline's latent cache split as its training split it: ``(training rows, validation rows)``."""
    recipe = yaml.safe_load((pipeline_dir / TRAINING_CONFIG_FILE).read_text())
    cache = open_arrow_shards(sorted((pipeline_dir / LATENT_CACHE_DIR).glob(SHARD_GLOB)))
    return split_train_validation(cache, recipe["validation_fraction"], recipe["seed"])


def latent_score_sets(pipe, train: ad.AnnData, training_rows, validation_rows):
    """``(validation latents, their labels, training latents, their labels)``: the VAE's standardised, flattened
    latents `[N, T * D]` of the pipeline's latent-cache rows (`latent_cache_split`), labels by `train`'s obs."""
    (label_key,) = pipe.conditioner.covariate_names
    sets = []
    for rows in (validation_rows, training_rows):
        latents = torch.as_tensor(np.stack(rows.with_format("numpy")["latents"]), dtype=torch.float32)
        sets += [pipe.vae.normalize_latents(latents).flatten(1).numpy(),
                 train.obs.loc[list(rows["cell_id"]), label_key].astype(str).to_numpy()]
    return sets


def memorised_line(per_seed: list[dict[str, float]]) -> str:
    """The sentence under a table of `score_pipeline` scores (one dict per seed): the training cells' latent scores."""
    scores = ", ".join(f"{metric} {mean_sd([scores[f'training {metric}'] for scores in per_seed])}"
                       for metric in LATENT_METRICS)
    return f"The training cells' latents against the validation cells (a DiT that memorised them): {scores}."


def score_pipeline(pipeline_dir: Path, train: ad.AnnData, settings) -> dict[tuple, dict[str, float]]:
    """`{(guidance, steps, scheduler): {metric: mean over sampling seeds}}` of one trained pipeline on its validation
    cells: the count metrics, and ``latent MMD²`` / ``latent energy`` (one generated latent per validation cell
    against the encoded cells, per label) with ``training MMD²`` / ``training energy`` (the training cells' latents,
    what a DiT that memorised them would score)."""
    pipe = load_pipeline(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    covariates = pipe.conditioner.covariate_names
    (label_key,) = covariates
    training_rows, validation_rows = latent_cache_split(pipeline_dir)
    held_out = train.obs_names.isin(list(validation_rows["cell_id"]))
    real, reference = train[held_out].copy(), train[~held_out].copy()
    conditions = real.obs[covariates].astype(str).loc[real.obs.index.repeat(GENERATED_PER_CELL)].reset_index(drop=True)
    real_latents, real_labels, trained_latents, trained_labels = latent_score_sets(pipe, train, training_rows,
                                                                                   validation_rows)
    default_scheduler, scores = pipe.scheduler, {}
    for guidance, steps, scheduler in settings:
        pipe.scheduler = scheduler_named(scheduler, default_scheduler.config)
        per_seed = {}
        for sampling_seed in SAMPLING_SEEDS:
            options = {"guidance_scale": guidance, "num_inference_steps": steps,
                       "generator": torch.Generator().manual_seed(sampling_seed)}
            cells = pipe(conditions=conditions, **options).cells
            mean = evaluate_generation(real, cells, covariates, reference=reference, seed=sampling_seed).loc["mean"]
            options["generator"].manual_seed(sampling_seed)
            latents = pipe(conditions={label_key: list(real_labels)}, output_type="latent", **options).cells
            latent = latent_scores(real_latents, real_labels, pipe.vae.normalize_latents(latents).flatten(1).numpy(),
                                   trained_latents, trained_labels, sampling_seed)
            for metric in METRICS:
                per_seed.setdefault(metric, []).append(float(mean[metric]))
            for metric in LATENT_METRICS:
                per_seed.setdefault(f"latent {metric}", []).append(latent[metric][0])
                per_seed.setdefault(f"training {metric}", []).append(latent[metric][1])
        scores[guidance, steps, scheduler] = {metric: float(np.mean(values)) for metric, values in per_seed.items()}
        print(f"  guidance {guidance} steps {steps} {scheduler}: " + ", ".join(
            f"{metric} {value:.4f}" for metric, value in scores[guidance, steps, scheduler].items()), flush=True)
    pipe.scheduler = default_scheduler
    return scores


def main() -> None:
    parser = workdir_argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--schedulers", nargs="+", default=["euler"], choices=SCHEDULERS,
                        help="samplers; dopri5 chooses its own steps (run once, steps column 'adaptive')")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = [(guidance, steps, scheduler)
                for guidance, scheduler in itertools.product(args.guidance, args.schedulers)
                for steps in (args.steps if scheduler != "dopri5" else [1])]
    for name in args.datasets:
        per_seed = []
        for seed in args.seeds:
            folder = args.workdir / name / f"seed{seed}"
            print(f"{name} seed {seed}", flush=True)
            per_seed.append(score_pipeline(folder / "pipeline", ad.read_h5ad(folder / "train.h5ad"), settings))
        num_cells = len(latent_cache_split(args.workdir / name / f"seed{args.seeds[0]}" / "pipeline")[1])
        lines = ["| guidance | steps | scheduler | " + " | ".join(SCORE_COLUMNS) + " |",
                 "|---|---|---|" + "---|" * len(SCORE_COLUMNS)]
        for setting in settings:
            steps = setting[1] if setting[2] != "dopri5" else "adaptive"
            lines.append(f"| {setting[0]:g} | {steps} | {setting[2]} | " + " | ".join(
                mean_sd([scores[setting][metric] for scores in per_seed]) for metric in SCORE_COLUMNS) + " |")
        print(f"\n### {name}: validation cells of each pipeline ({num_cells} at seed {args.seeds[0]}), seeds "
              f"{args.seeds}, {GENERATED_PER_CELL} generated per cell, mean over sampling seeds "
              f"{list(SAMPLING_SEEDS)}\n\n" + "\n".join(lines) + "\n\n"
              + memorised_line([scores[settings[0]] for scores in per_seed]) + "\n", flush=True)


if __name__ == "__main__":
    main()
