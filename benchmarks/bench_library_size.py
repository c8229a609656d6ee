"""Library-size model of generated cells: per-label log-normal vs. the latent regression, on training cells only.

For each trained scLDM pipeline of a `bench_diagnosis.py` workdir (``WORKDIR/<dataset>/seed<k>/{pipeline,train.h5ad}``:
the diagnosis split's training cells), the training cells are split again at random, 60 % to fit the library-size
models (`CellConditioner.fit_library_size`, and `fit_latent_library_size` on the cells' encoded latents at ridge 1,
session 11's fixed penalty, and at the ridge chosen by generalised cross-validation, the default since), 40 % held
out. Scored on the held-out cells:

- depth given the latent: Gaussian NLL per cell and residual sd of the held-out cells' log library size under each
  model, given their labels and (latent model) their encoded latents;
- generation: the same generated latents (the pipeline's DiT, two per held-out cell, for its labels) decoded at
  library sizes drawn from each model, scored by `evaluate_generation` against the held-out cells (PCA fitted on
  the 60 %), for three sampling seeds.

Neither the diagnosis' floor nor its test cells are read, so the choice of model can be made on this table. Caveat
printed with it: the VAE and the DiT were trained on all training cells, the held-out 40 % included; only the
library-size models have not seen them.

    python benchmarks/bench_library_size.py --workdir /work/diag --datasets kang2018 celltypist pbmc68k --seeds 0 1 2
"""

from pathlib import Path

import anndata as ad
import numpy as np
import torch
from bench_diagnosis import workdir_argument_parser

from scldm_hf.data import encode_dataset
from scldm_hf.evaluation import evaluate_generation
from scldm_hf.loading import load_pipeline
from scldm_hf.models.conditioning import CellConditioner

FIT_FRACTION = 0.6
GENERATED_PER_CELL = 2
SAMPLING_SEEDS = (0, 1, 2)
METRICS = ("mmd_rbf", "energy_distance", "nn_accuracy", "classifier_auroc")
# latent-model rows -> ridge: session 11's fixed penalty, and the cross-validated choice (the default since)
LATENT_RIDGES = {"latent, ridge 1": 1.0, "latent, GCV ridge": None}
MODELS = ("labels", *LATENT_RIDGES)


def fitted_models(conditioner, label_ids, library_size, features) -> dict[str, CellConditioner]:
    """The library-size models fitted on the given cells (label ids `{name: [n]}`, sizes `[n]`, features `[n, F]`)."""
    labels_only = CellConditioner(covariate_labels=conditioner.config.covariate_labels)
    labels_only.fit_library_size(label_ids, library_size)
    models = {"labels": labels_only}
    for name, ridge in LATENT_RIDGES.items():
        models[name] = CellConditioner(covariate_labels=conditioner.config.covariate_labels)
        models[name].fit_latent_library_size(lambda: [(label_ids, library_size, features)], ridge=ridge)
    return models


def depth_scores(model: CellConditioner, label_ids, library_size, features) -> dict[str, float]:
    """Gaussian NLL per cell and residual sd of log library size `[n]` under `model`."""
    mean, var = model.log_library_size_distribution(label_ids, len(library_size), features)
    residual = library_size.log() - mean
    nll = 0.5 * (torch.log(2 * torch.pi * var) + residual**2 / var)
    return {"NLL log library size": float(nll.mean()), "residual sd": float(residual.std())}


def score_pipeline(pipeline_dir: Path, train: ad.AnnData, seed: int) -> dict[str, dict[str, list[float]]]:
    """`{model: {metric: [score per sampling seed (depth scores: one)]}}` of one trained pipeline."""
    pipe = load_pipeline(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    covariates = pipe.conditioner.covariate_names
    latents = torch.from_numpy(encode_dataset(pipe.vae, train))
    features = pipe.vae.normalize_latents(latents).flatten(1)
    label_ids = pipe.conditioner.encode(train.obs[covariates].astype(str))
    library_size = torch.as_tensor(np.asarray(train.X.sum(axis=1)).ravel(), dtype=torch.float32)
    order = np.random.default_rng(seed).permutation(train.n_obs)
    fit, held_out = np.sort(order[:int(FIT_FRACTION * train.n_obs)]), np.sort(order[int(FIT_FRACTION * train.n_obs):])

    def rows(index):
        return {name: ids[index] for name, ids in label_ids.items()}, library_size[index], features[index]

    models = fitted_models(pipe.conditioner, *rows(fit))
    scores = {name: {metric: [value] for metric, value in depth_scores(model, *rows(held_out)).items()}
              for name, model in models.items()}
    real, reference = train[held_out].copy(), train[fit].copy()
    conditions = real.obs[covariates].astype(str).loc[real.obs.index.repeat(GENERATED_PER_CELL)].reset_index(drop=True)
    generated_ids = pipe.conditioner.encode(conditions)
    for sampling_seed in SAMPLING_SEEDS:
        generated = pipe(conditions=conditions, output_type="latent",
                         generator=torch.Generator().manual_seed(sampling_seed)).cells
        for name, model in models.items():
            pipe.register_modules(conditioner=model)
            counts = pipe.sample_counts(generated, generated_ids, torch.Generator().manual_seed(sampling_seed))
            cells = ad.AnnData(counts, obs=conditions)
            cells.var_names = pipe.vae.config.gene_names
            mean = evaluate_generation(real, cells, covariates, reference=reference, seed=sampling_seed).loc["mean"]
            for metric in METRICS:
                scores[name].setdefault(metric, []).append(float(mean[metric]))
    return scores


def mean_sd(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(per_seed: list[dict]) -> str:
    """Markdown rows per metric: mean ± sd over training seeds (each the mean over sampling seeds), every model."""
    lines = ["| metric | " + " | ".join(MODELS) + " |", "|---" * (len(MODELS) + 1) + "|"]
    for metric in per_seed[0]["labels"]:
        cells = [mean_sd([np.mean(scores[name][metric]) for scores in per_seed]) for name in MODELS]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = workdir_argument_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.datasets:
        per_seed = []
        for seed in args.seeds:
            folder = args.workdir / name / f"seed{seed}"
            per_seed.append(score_pipeline(folder / "pipeline", ad.read_h5ad(folder / "train.h5ad"), seed))
            print(f"{name} seed {seed}: " + ", ".join(
                f"{model} {metric} {np.mean(values):.4f}" for model in MODELS
                for metric, values in per_seed[-1][model].items()), flush=True)
        print(f"\n### {name}: seeds {args.seeds}, {FIT_FRACTION:.0%} of the training cells fit, the rest held out; "
              f"generation mean over sampling seeds {list(SAMPLING_SEEDS)}\n\n{table(per_seed)}\n\n"
              "Caveat: the VAE and DiT saw the held-out cells in training; only the library-size models did not.\n",
              flush=True)


if __name__ == "__main__":
    main()
