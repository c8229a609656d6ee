"""Per-stage diagnosis of scLDM against scVI: which stage of generation loses the distance to scVI.

For each data set and seed: a stratified 60/20/20 split (train / real floor / test); scLDM (both stages early-stopped
on the held-out loss of 10% of the training cells) and scVI (scvi-tools' defaults: epoch heuristic, no early stopping)
train on the train cells. Each stage is then scored against the held-out test cells, the real floor beside it:

- (a) VAE round trip, the ceiling of stage 1: test cells encoded (posterior mean), decoded at their own library sizes,
  counts drawn from the NB; scVI's round trip likewise (z = posterior mean of q(z | x)).
- (b) latent prior: generated latents (scLDM: the DiT; scVI: its aggregate posterior, q(z | x) of random training
  cells of the label) against the encoded test cells, per label, in each model's latent space standardised by its
  training cells' latent means and stds (scLDM: the VAE's latent statistics; scVI: posterior means of the training
  cells), the floor being the encoded floor cells; then those latents decoded at the test cells' real library sizes.
- (c) library-size model: KS statistic and W1 of log library sizes drawn for the test labels (scLDM: its per-label
  log-normal, shifted by the latent regression for the generated latents of (b) where the pipeline has one, or the
  depths of those latents' nearest training cells with the nearest-cell model; scVI's generator: the library size
  of a random training cell of the label) against the test cells'.
- (d) count noise model: the round-trip counts of (a) (same decoded means, NB draw) against the real test counts, by
  per-gene zero fraction and log1p Fano factor (variance / mean), mean absolute error over genes, per label.
- (e) full generation, as `bench_generation.py` scores it (library sizes from each model's library-size model).

Count-space scores are `evaluate_generation`'s (PCA-30 of log1p CP10k fitted on the training cells, equal cells per
label, floor = the floor cells against the test cells). The final line per data set splits the full-generation gap
in MMD^2 (scLDM minus scVI) into the VAE round trip (a), the latent prior (b, decoded minus a) and the library-size
model (e minus b, decoded): the stage with the largest share loses the distance.

Data sets: PBMC68k (765 genes, 10 cell types), Kang 2018 (7 cell types, control and IFN-beta cells pooled per type)
and the celltypist sample, which has no labels and is scored as one pooled label. Kang and celltypist are cut to the
2,000 most variable genes of their training cells (Seurat v3). Nothing is chosen on the test cells. With
`--selection-split` the whole diagnosis runs inside each seed's training cells (split again 60/20/20), for choosing
a recipe without reading the floor or test cells.

    python benchmarks/bench_diagnosis.py --datasets pbmc68k --seeds 0
    python benchmarks/bench_diagnosis.py --data mine.h5ad --label-key cell_type --seeds 0 1 2
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
import yaml
from bench_generation import (
    DATASETS,
    chosen_datasets,
    data_argument_parser,
    load_dataset,
    run_environment,
    variable_genes_of_training_cells,
)
from scipy.stats import ks_2samp, wasserstein_distance

from scldm_hf.data import encode_dataset
from scldm_hf.evaluation import FLOOR_SUFFIX, ScviGenerator, energy_distance, evaluate_generation, mmd_rbf
from scldm_hf.evaluation.evaluate import equal_count_groups
from scldm_hf.evaluation.genes import gene_moments
from scldm_hf.evaluation.preprocessing import align_genes, condition_labels, count_matrix
from scldm_hf.loading import load_pipeline
from scldm_hf.models.modeling_scvae import sample_negative_binomial
from scldm_hf.training.config import LIBRARY_SIZE_MODELS
from scldm_hf.training.dit import refit_library_size_model
from scldm_hf.workflows.side_by_side import stratified_split, train_scldm

COUNT_METRICS = ("mmd_rbf", "energy_distance", "nn_accuracy", "classifier_auroc")
MIN_CELLS = 10


def library_size(cells: ad.AnnData) -> np.ndarray:
    return np.asarray(count_matrix(cells).sum(axis=1)).ravel()


def with_counts(like: ad.AnnData, counts, genes) -> ad.AnnData:
    """AnnData of `counts [N, len(genes)]` (columns = `genes`, the model's order) with the obs of `like` (a
    cell-by-cell counterpart), its columns reordered to `like`'s genes."""
    cells = ad.AnnData(X=count_matrix(ad.AnnData(counts)).astype(np.float32), obs=like.obs.copy(),
                       var=pd.DataFrame(index=pd.Index(genes)))
    return align_genes(like, cells).copy()


def count_scores(test, cells, label_key, train, floor, seed) -> dict[str, tuple[float, float]]:
    """`{metric: (score, real floor)}` of `evaluate_generation`'s mean row (the protocol)."""
    mean = evaluate_generation(test, cells, label_key, reference=train, real_floor=floor, min_cells=MIN_CELLS,
                               seed=seed).loc["mean"]
    return {metric: (mean[metric], mean[metric + FLOOR_SUFFIX]) for metric in COUNT_METRICS}


def latent_scores(test_latents, test_labels, generated, floor_latents, floor_labels, seed) -> dict[str, tuple]:
    """`{metric: (generated, floor)}`: MMD² and energy per label of flattened standardised latents, averaged."""
    groups, _ = equal_count_groups({"real": test_labels, "generated": test_labels, "floor": floor_labels},
                                   MIN_CELLS, 2000, np.random.default_rng(seed))
    latents = {"real": test_latents, "generated": generated, "floor": floor_latents}
    per_group = {name: {side: [] for side in ("generated", "floor")} for name in ("MMD²", "energy")}
    for cells in groups.values():
        real = latents["real"][cells["real"]]
        for side in ("generated", "floor"):
            per_group["MMD²"][side].append(mmd_rbf(real, latents[side][cells[side]]))
            per_group["energy"][side].append(energy_distance(real, latents[side][cells[side]]))
    return {name: (np.mean(sides["generated"]), np.mean(sides["floor"])) for name, sides in per_group.items()}


def per_label_mean(score, test_labels, labels, values, test_values) -> float:
    """`score(values of a label, test values of that label)` averaged over the test labels."""
    return float(np.mean([score(values[labels == label], test_values[test_labels == label])
                          for label in np.unique(test_labels)]))


def library_size_scores(generated, test_sizes, test_labels, floor_sizes, floor_labels) -> dict[str, tuple]:
    """`{metric: (generated, floor)}`: KS statistic and W1 of log library sizes per label, averaged."""
    scores = {"KS log library size": lambda a, b: ks_2samp(a, b).statistic,
              "W1 log library size": wasserstein_distance}
    log_test = np.log(test_sizes)
    return {name: (per_label_mean(score, test_labels, test_labels, np.log(generated), log_test),
                   per_label_mean(score, test_labels, floor_labels, np.log(floor_sizes), log_test))
            for name, score in scores.items()}


def noise_errors(counts, real_counts) -> dict[str, float]:
    """Mean absolute error over genes of per-gene zero fraction and log1p Fano factor, `counts` vs `real_counts`."""
    moments, real = gene_moments(counts), gene_moments(real_counts)
    fano = (moments["variance"] / moments["mean"]).fillna(0)
    real_fano = (real["variance"] / real["mean"]).fillna(0)
    return {"zero fraction MAE": float((moments["zero_fraction"] - real["zero_fraction"]).abs().mean()),
            "log1p Fano MAE": float((np.log1p(fano) - np.log1p(real_fano)).abs().mean())}


def noise_scores(cells, test, floor, label_key) -> dict[str, tuple]:
    """`{metric: (cells, floor)}` of `noise_errors` against the test cells, per label, averaged."""
    test_labels, floor_labels = condition_labels(test, label_key), condition_labels(floor, label_key)
    counts, test_counts, floor_counts = count_matrix(cells), count_matrix(test), count_matrix(floor)
    by_label = [(noise_errors(counts[test_labels == label], test_counts[test_labels == label]),
                 noise_errors(floor_counts[floor_labels == label], test_counts[test_labels == label]))
                for label in np.unique(test_labels)]
    return {name: (np.mean([ours[name] for ours, _ in by_label]), np.mean([fl[name] for _, fl in by_label]))
            for name in by_label[0][0]}


def diagnose_scldm(pipeline_dir, train, floor, test, label_key, seed,
                   decode_latent_noise: float | None = None) -> dict[str, dict]:
    """`{stage: {metric: (score, floor)}}` of the trained scLDM pipeline. With `decode_latent_noise` the generated
    latents of (b) and (e) are decoded plus Gaussian noise of that many training-latent stds per coordinate (the
    library-size model reads the clean latent; the cells of (e) are generated latent first, then decoded)."""
    pipe = load_pipeline(pipeline_dir)
    generator = torch.Generator().manual_seed(seed)
    labels, floor_labels = condition_labels(test, label_key), condition_labels(floor, label_key)
    test_sizes = torch.as_tensor(library_size(test), dtype=torch.float32)

    def standardized(latents):
        return pipe.vae.normalize_latents(latents).flatten(1).numpy()

    def decoder_input(latents):
        """The generated `latents [N, T, D]` as the decoder reads them."""
        if decode_latent_noise is None:
            return latents
        noise = torch.randn(latents.shape, generator=generator)
        return pipe.vae.denormalize_latents(pipe.vae.normalize_latents(latents) + decode_latent_noise * noise)

    test_latents = torch.from_numpy(encode_dataset(pipe.vae, test))
    genes = pipe.vae.config.gene_names
    round_trip = with_counts(test, pipe.decode_counts(test_latents, test_sizes, generator), genes)
    conditions = {label_key: list(labels)}
    generated_latents = pipe(conditions=conditions, output_type="latent", generator=generator).cells
    decoded = with_counts(test, pipe.decode_counts(decoder_input(generated_latents), test_sizes, generator), genes)
    label_ids = pipe.conditioner.encode(conditions)
    sizes = pipe.sample_library_size(generated_latents, label_ids, generator).numpy()
    if decode_latent_noise is None:
        full = pipe(conditions=conditions, generator=generator).cells
    else:
        latents = pipe(conditions=conditions, output_type="latent", generator=generator).cells
        full_sizes = pipe.sample_library_size(latents, label_ids, generator)
        full = with_counts(test, pipe.decode_counts(decoder_input(latents), full_sizes, generator), genes)

    floor_latents = standardized(torch.from_numpy(encode_dataset(pipe.vae, floor)))
    return {
        "a": count_scores(test, round_trip, label_key, train, floor, seed),
        "b latent": latent_scores(standardized(test_latents), labels, standardized(generated_latents), floor_latents,
                                  floor_labels, seed),
        "b decoded": count_scores(test, decoded, label_key, train, floor, seed),
        "c": library_size_scores(sizes, test_sizes.numpy(), labels, library_size(floor), floor_labels),
        "d": noise_scores(round_trip, test, floor, label_key),
        "e": count_scores(test, full, label_key, train, floor, seed),
    }


def diagnose_scvi(scvi: ScviGenerator, train, floor, test, label_key, seed) -> dict[str, dict]:
    """`{stage: {metric: (score, floor)}}` of a fitted `ScviGenerator` (floors of latent rows in scVI's space)."""
    generator = torch.Generator().manual_seed(seed)
    labels, floor_labels = condition_labels(test, label_key), condition_labels(floor, label_key)
    test_sizes = torch.as_tensor(library_size(test), dtype=torch.float32)

    test_mean, test_std = scvi.posterior(test)
    mean, inverse_dispersion = scvi.decode(test_mean, test_sizes)
    round_trip = with_counts(test, sample_negative_binomial(mean, inverse_dispersion, generator=generator).numpy(),
                             scvi.gene_names)
    training_mean = scvi.posterior_mean.mean(dim=0)
    training_std = scvi.posterior_mean.std(dim=0)

    def standardized(latents):
        return ((latents - training_mean) / training_std).numpy()

    def posterior_sample(mean, std):
        return mean + std * torch.randn(mean.shape, generator=generator)

    floor_mean, floor_std = scvi.posterior(floor)
    generated_latents = scvi.sample_latents(labels, seed=seed)
    decoded = with_counts(test, scvi.sample(labels, library_sizes=test_sizes.numpy(), seed=seed).X, scvi.gene_names)
    return {
        "a": count_scores(test, round_trip, label_key, train, floor, seed),
        "b latent": latent_scores(standardized(posterior_sample(test_mean, test_std)), labels,
                                  standardized(generated_latents), standardized(posterior_sample(floor_mean, floor_std)),
                                  floor_labels, seed),
        "b decoded": count_scores(test, decoded, label_key, train, floor, seed),
        "c": library_size_scores(scvi.library_sizes(labels, seed=seed).numpy(), test_sizes.numpy(), labels,
                                 library_size(floor), floor_labels),
        "d": noise_scores(round_trip, test, floor, label_key),
        "e": count_scores(test, scvi.sample(labels, seed=seed), label_key, train, floor, seed),
    }


STAGES = {
    "a": "(a) VAE round trip",
    "b latent": "(b) latent prior vs encoded test cells",
    "b decoded": "(b) latent prior, decoded at real library sizes",
    "c": "(c) library-size model",
    "d": "(d) count noise model (round-trip NB draw)",
    "e": "(e) full generation",
}
MODELS = ("scLDM", "scVI")


def mean_sd(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def diagnosis_table(runs: list[dict]) -> str:
    """Markdown table over seeds: one row per stage and metric, columns scLDM, scVI and the real floor (latent rows:
    the floor in each model's own latent space, scLDM's / scVI's)."""
    lines = ["| stage | metric | scLDM | scVI | real floor |", "|---|---|---|---|---|"]
    for stage, title in STAGES.items():
        for metric in runs[0]["scLDM"][stage]:
            cells = {model: [run[model][stage][metric] for run in runs] for model in MODELS}
            floors = [mean_sd([score[1] for score in cells[model]]) for model in MODELS]
            floor = floors[0] if stage != "b latent" else " / ".join(floors)
            lines.append(f"| {title} | {metric} | " + " | ".join(mean_sd([score[0] for score in cells[model]])
                                                                for model in MODELS) + f" | {floor} |")
    return "\n".join(lines)


def stage_of_the_gap(runs: list[dict]) -> str:
    """The full-generation MMD² gap (scLDM - scVI) split into round trip, latent prior and library-size model."""
    def gap(stage):
        return np.mean([run["scLDM"][stage]["mmd_rbf"][0] - run["scVI"][stage]["mmd_rbf"][0] for run in runs])

    shares = {"VAE round trip (a)": gap("a"), "latent prior (b)": gap("b decoded") - gap("a"),
              "library-size model (c)": gap("e") - gap("b decoded")}
    listed = ", ".join(f"{name} {share:+.4f}" for name, share in shares.items())
    loser = max(shares, key=shares.get)
    if gap("e") <= 0:
        return f"scLDM is not behind scVI in full generation (MMD² gap {gap('e'):+.4f}); stage shares: {listed}."
    return f"full-generation MMD² gap scLDM - scVI {gap('e'):+.4f} = {listed}: the {loser} loses the distance."


PAIRED_ROWS = [("e", metric) for metric in COUNT_METRICS] + [("b decoded", "mmd_rbf"), ("c", "KS log library size")]


def paired_table(runs: list[dict], baseline_runs: list[dict], seeds: list[int]) -> str:
    """Markdown table of the same seeds diagnosed twice (e.g. one trained pipeline per seed, two library-size models):
    per seed the full-generation MMD² of both scLDM arms, scVI's and the floor (this run's), then per metric the mean
    ± sd over seeds of the paired differences, this run minus the baseline and this run minus scVI."""
    def score(run, model, stage, metric):
        return run[model][stage][metric][0]

    lines = ["| seed | scLDM (this run) | scLDM (baseline) | scVI | floor |", "|---|---|---|---|---|"]
    for seed, run, baseline in zip(seeds, runs, baseline_runs):
        lines.append(f"| {seed} | {score(run, 'scLDM', 'e', 'mmd_rbf'):.3f} | {score(baseline, 'scLDM', 'e', 'mmd_rbf'):.3f}"
                     f" | {score(run, 'scVI', 'e', 'mmd_rbf'):.3f} | {run['scLDM']['e']['mmd_rbf'][1]:.3f} |")
    lines += ["", "| stage | metric | this run | baseline | this run - baseline | this run - scVI |",
              "|---|---|---|---|---|---|"]
    for stage, metric in PAIRED_ROWS:
        ours = np.array([score(run, "scLDM", stage, metric) for run in runs])
        base = np.array([score(run, "scLDM", stage, metric) for run in baseline_runs])
        scvi = np.array([score(run, "scVI", stage, metric) for run in runs])
        lines.append(f"| {STAGES[stage]} | {metric} | {mean_sd(ours)} | {mean_sd(base)} | {mean_sd(ours - base)} | "
                     f"{mean_sd(ours - scvi)} |")
    return "\n".join(lines)


def training_length(stage_dir: Path) -> str:
    """``"<steps run> (best <step>)"`` of a trained stage, read from its ``logs/metrics.csv``: the best check of the
    score its early stopping watched (``early_stopping_metric`` of its ``training_config.yaml``)."""
    metrics = pd.read_csv(stage_dir / "logs" / "metrics.csv")
    watched = yaml.safe_load((stage_dir / "training_config.yaml").read_text()).get("early_stopping_metric",
                                                                                 "validation_loss")
    validation = metrics[metrics["metric"] == watched]
    best = int(validation.loc[validation["value"].idxmin(), "step"]) if len(validation) else None
    return f"{int(metrics['step'].max())} (best {best})"


def diagnose(cells: ad.AnnData, label_key: str, seed: int, recipe: Path, overrides: dict, dit_overrides: dict,
             workdir: Path, reuse_trained: bool = False, scvi_early_stopping: bool = False,
             refit_library_size: str | None = None, selection_split: bool = False,
             decode_latent_noise: float | None = None) -> dict:
    """One seed: split, train both models, diagnose both; returns ``{"scores", "wall_s", "cpu_s", "steps"}``.

    `reuse_trained` takes the scLDM pipeline already trained in `workdir` (a rerun of the diagnosis only), with
    `refit_library_size` ("labels" / "latent" / "nearest") its library-size model refitted first (`refit_library_size_model`);
    `scvi_early_stopping` stops scVI on its held-out ELBO instead of its whole epoch heuristic (scvi-tools' default).
    `selection_split` diagnoses inside the seed's training cells (split again 60/20/20), never reading its floor or
    test cells, so that a recipe can be chosen on the result. `decode_latent_noise`: see `diagnose_scldm`.
    """
    split = stratified_split(cells, label_key, seed=seed)
    if selection_split:
        split = stratified_split(split[0], label_key, seed=seed)
    train, floor, test = variable_genes_of_training_cells(split)
    wall, cpu = {}, {}
    start, cpu_start = time.perf_counter(), time.process_time()
    pipeline_dir = workdir / "pipeline"
    if not (reuse_trained and (pipeline_dir / "model_index.json").is_file()):
        pipeline_dir = train_scldm(train, label_key, recipe, workdir, {**overrides, "seed": seed}, dit_overrides)
    elif refit_library_size:
        refit_library_size_model(pipeline_dir, refit_library_size)
    wall["scLDM"], cpu["scLDM"] = time.perf_counter() - start, time.process_time() - cpu_start
    start, cpu_start = time.perf_counter(), time.process_time()
    scvi = ScviGenerator(label_key, seed=seed, early_stopping=scvi_early_stopping).fit(train)
    wall["scVI"], cpu["scVI"] = time.perf_counter() - start, time.process_time() - cpu_start
    steps = {"VAE": training_length(workdir / "vae"), "DiT": training_length(pipeline_dir),
             "scVI epochs": len(scvi.model.history["elbo_train"])}
    print(f"seed {seed}: training wall time {wall}, CPU time {cpu}, steps {steps}", flush=True)
    scores = {"scLDM": diagnose_scldm(pipeline_dir, train, floor, test, label_key, seed, decode_latent_noise),
              "scVI": diagnose_scvi(scvi, train, floor, test, label_key, seed)}
    return {"scores": scores, "wall_s": wall, "cpu_s": cpu, "steps": steps}


def run_seed(cells, label_key, seed, args, overrides, dit_overrides, workdir: Path) -> dict:
    """`diagnose` one seed, its record kept in ``workdir/record.json``: a rerun with ``--resume`` reads it back."""
    record_path = workdir / "record.json"
    if args.resume and record_path.is_file():
        return json.loads(record_path.read_text())
    record = diagnose(cells, label_key, seed, args.recipe, overrides, dit_overrides, workdir, args.reuse_trained,
                      args.scvi_early_stopping, args.refit_library_size, args.selection_split,
                      args.decode_latent_noise)
    workdir.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1))
    return record


def workdir_argument_parser(description: str) -> argparse.ArgumentParser:
    """The options of a benchmark that reads a diagnosis workdir's trained seeds: --workdir, --datasets, --seeds,
    --threads (callers set ``torch.set_num_threads(args.threads)``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workdir", type=Path, required=True, help="a bench_diagnosis.py --workdir")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    return parser


def given(**options) -> dict:
    """The recipe overrides passed on the command line (options left at None keep the recipe's value)."""
    return {name: value for name, value in options.items() if value is not None}


def main() -> None:
    parser = data_argument_parser(__doc__.splitlines()[0], seeds=[0])
    parser.add_argument("--patience", type=int, help="early_stopping_patience of both stages (default: the recipe's)")
    parser.add_argument("--vae-validation-steps", type=int)
    parser.add_argument("--dit-validation-steps", type=int)
    parser.add_argument("--vae-max-steps", type=int, help="upper bound of the early-stopped VAE (default: the recipe's)")
    parser.add_argument("--dit-max-steps", type=int, help="upper bound of the early-stopped DiT (default: the recipe's)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the trained models in WORKDIR/<dataset>/seed<k> (default: a temporary folder)")
    parser.add_argument("--reuse-trained", action="store_true",
                        help="with --workdir: diagnose the scLDM pipelines already trained there instead of training")
    parser.add_argument("--refit-library-size", choices=LIBRARY_SIZE_MODELS,
                        help="with --reuse-trained: refit the reused pipelines' library-size model (in place) on "
                             "their own latent caches' training rows before scoring; VAE and DiT unchanged")
    parser.add_argument("--scvi-early-stopping", action=argparse.BooleanOptionalAction, default=False,
                        help="stop scVI on its held-out ELBO (the runs of sessions 8-10 did), or train it for its "
                             "whole epoch heuristic (default: scvi-tools' own)")
    parser.add_argument("--selection-split", action="store_true",
                        help="diagnose inside each seed's training cells, split again 60/20/20 (train / floor / "
                             "held-out): the data set's floor and test cells are never read, so a recipe (--recipe) "
                             "can be chosen on this table")
    parser.add_argument("--decode-latent-noise", type=float, metavar="SD",
                        help="decode scLDM's generated latents plus Gaussian noise of SD training-latent stds per "
                             "coordinate (e.g. the decoder_latent_noise its VAE was trained with); library sizes "
                             "still follow the clean latent")
    parser.add_argument("--paired-with", type=Path, metavar="WORKDIR",
                        help="also print the paired differences to the same seeds diagnosed in WORKDIR (their "
                             "record.json), e.g. the same trained pipelines before --refit-library-size")
    parser.add_argument("--resume", action="store_true",
                        help="with --workdir: read back the seeds already diagnosed there (WORKDIR/<dataset>/seed<k>/"
                             "record.json), e.g. seeds run by separate processes, and diagnose only the others")
    args = parser.parse_args()
    overrides = {"num_threads": args.threads, **given(early_stopping_patience=args.patience,
                                                      validation_steps=args.vae_validation_steps,
                                                      max_train_steps=args.vae_max_steps)}
    dit_overrides = {"num_eval_cells": 0, **given(validation_steps=args.dit_validation_steps,
                                                  max_train_steps=args.dit_max_steps)}

    for name, load in chosen_datasets(args, load_dataset).items():
        cells, label_key = load()
        records = []
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as scratch:
                workdir = Path(scratch) if args.workdir is None else args.workdir / name / f"seed{seed}"
                records.append(run_seed(cells, label_key, seed, args, overrides, dit_overrides, workdir))
        runs = [record["scores"] for record in records]
        times = ", ".join(f"{model} {mean_sd([record[kind][model] for record in records])} s {kind.split('_')[0]}"
                          for model in MODELS for kind in ("wall_s", "cpu_s"))
        steps = "; ".join(f"seed {seed}: " + ", ".join(f"{stage} {length}" for stage, length in record["steps"].items())
                          for seed, record in zip(args.seeds, records))
        print(f"\n### {name}: {cells.n_obs} cells, label {label_key!r}, seeds {args.seeds}\n\n"
              f"Environment: {run_environment()}.\nTraining time: {times}."
              f"\nTraining length (steps run, best held-out check): {steps}.\n\n{diagnosis_table(runs)}\n\n"
              f"{stage_of_the_gap(runs)}\n", flush=True)
        if args.paired_with:
            baseline_runs = [json.loads((args.paired_with / name / f"seed{seed}" / "record.json").read_text())["scores"]
                             for seed in args.seeds]
            print(f"Paired with {args.paired_with}:\n\n{paired_table(runs, baseline_runs, args.seeds)}\n", flush=True)


if __name__ == "__main__":
    main()
