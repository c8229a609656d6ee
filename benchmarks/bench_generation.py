"""Generation quality side by side: scLDM vs scVI vs a naive NB, the real floor beside every score, over seeds.

For each dataset and seed: a stratified 60/20/20 split (train / real floor / test, with that seed); every model trains
on the train cells (with that seed) and generates the test cells' label composition; `evaluate_generation` scores each
against the test cells (the evaluation protocol: PCA fitted on the train cells, equal counts per label, floor beside).
Prints one markdown table per dataset (mean ± sd over seeds, CPU time of training + sampling per method, and the
headline metrics scLDM wins or loses against scVI beyond the larger seed sd) and appends them to benchmarks/RESULTS.md.
scVI runs at scvi-tools' defaults (epoch heuristic, no early stopping). scLDM trains with its
recipe, by default ``training/configs/default.yaml``: each stage early-stopped on the loss of its held-out cells
(``early_stopping_patience``), as ``bench_diagnosis.py`` does.

Datasets: PBMC68k (765 genes, 10 cell types) and every real dataset in ../shared/data: Kang 2018 (7 cell types,
control and IFN-beta cells pooled per type) and the celltypist sample, which ships without labels and is scored as
one pooled label. A dataset with more than 2,000 genes (``--data`` included) is cut, per seed, to the 2,000 most
variable genes of its training cells (Seurat v3 on counts): nothing is chosen on the floor or test cells.

    python benchmarks/bench_generation.py                                   # bundled datasets, seeds 0 1 2
    python benchmarks/bench_generation.py --datasets pbmc68k --seeds 0 1 2 3
    python benchmarks/bench_generation.py --data mine.h5ad --label-key cell_type   # any h5ad of counts
"""

import argparse
import importlib.metadata
import platform
import tempfile
import time
from pathlib import Path

import anndata as ad
import pandas as pd
import scanpy as sc
import torch

from scldm_hf.data import load_pbmc68k_counts
from scldm_hf.evaluation import FLOOR_SUFFIX
from scldm_hf.workflows.side_by_side import run_side_by_side, stratified_split

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
COLUMNS = ["mmd_rbf", "energy_distance", "nn_accuracy", "classifier_auroc", "wasserstein_2", "precision", "recall",
           "mean_pearson", "variance_pearson", "gene_correlation_all_cells", "cell_type_f1_generated", "cpu_time_s"]
# headline metric -> its ideal value (a win is being closer to it than scVI, beyond the larger seed sd)
HEADLINE = {"mmd_rbf": 0.0, "energy_distance": 0.0, "nn_accuracy": 0.5, "classifier_auroc": 0.5}


# the packages whose versions move a seeded run's numbers (gene selection, splits, random streams, scVI)
RECORDED_PACKAGES = ("torch", "numpy", "scipy", "scikit-learn", "scanpy", "anndata", "scvi-tools", "lightning",
                     "transformers", "diffusers", "datasets", "accelerate")

DATASETS = ("pbmc68k", "kang2018", "celltypist")
NUM_VARIABLE_GENES = 2000
POOLED_LABEL = "pooled"


def read_shared(file_name: str) -> ad.AnnData:
    path = SHARED / file_name
    if not path.is_file():
        raise SystemExit(f"{path} not found: bench_generation reads the real datasets from ../shared/data.")
    return ad.read_h5ad(path)


def load_dataset(name: str) -> tuple[ad.AnnData, str]:
    """`(counts, label column)` of a benchmark data set, all genes (the variable ones are chosen on training cells)."""
    if name == "pbmc68k":
        return load_pbmc68k_counts(), "cell_type"
    if name == "kang2018":
        return read_shared("kang2018_pbmc_ifnb_counts.h5ad"), "cell_type"
    if name == "celltypist":
        cells = read_shared("celltypist_sample_counts.h5ad")
        cells.obs[POOLED_LABEL] = pd.Categorical(["all cells"] * cells.n_obs)
        return cells, POOLED_LABEL
    raise SystemExit(f"unknown dataset {name!r}; choose from {DATASETS}")


def variable_genes_of_training_cells(parts: tuple[ad.AnnData, ...]) -> tuple[ad.AnnData, ...]:
    """Every part cut to the `NUM_VARIABLE_GENES` most variable genes of the first (training) part, if it has more."""
    train = parts[0]
    if train.n_vars <= NUM_VARIABLE_GENES:
        return parts
    variable = sc.pp.highly_variable_genes(train, n_top_genes=NUM_VARIABLE_GENES, flavor="seurat_v3", inplace=False)
    keep = variable["highly_variable"].to_numpy()
    return tuple(part[:, keep].copy() for part in parts)


def run_environment() -> str:
    """``"torch 2.13.0, numpy 2.4.6, ...; CPU <model>"``: the same seed reproduces a table only with the same versions
    of `RECORDED_PACKAGES` and, on CPU, the same processor (its kernels: RESULTS.md, sessions 13-14)."""
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    packages = ", ".join(f"{name} {version(name)}" for name in RECORDED_PACKAGES)
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
              if line.startswith("model name")]
    return f"{packages}; CPU {models[0] if models else platform.processor() or 'unknown'}"


def seed_table(summaries: list[pd.DataFrame]) -> pd.DataFrame:
    """`mean ± sd` over seeds of each model's `COLUMNS` and of the first model's floors (one row "real floor")."""
    runs = pd.concat(summaries, keys=range(len(summaries)), names=["seed", "model"])
    floors = runs[[f"{column}{FLOOR_SUFFIX}" for column in COLUMNS if f"{column}{FLOOR_SUFFIX}" in runs]]
    floors = floors.groupby("seed").first().rename(columns=lambda name: name.removesuffix(FLOOR_SUFFIX))
    by_model = runs[[column for column in COLUMNS if column in runs]].groupby("model", sort=False)
    mean, sd = by_model.mean(), by_model.std()
    mean.loc["real floor"], sd.loc["real floor"] = floors.mean(), floors.std()
    return mean.round(3).astype(str) + " ± " + sd.round(3).astype(str)


def wins_beyond_noise(summaries: list[pd.DataFrame], model: str = "scLDM", rival: str = "scVI") -> str:
    """Headline metrics `model` wins / loses against `rival` by more than the larger of their seed sds."""
    runs = pd.concat(summaries, keys=range(len(summaries)), names=["seed", "model"])
    verdicts = []
    for metric, ideal in HEADLINE.items():
        distance = (runs[metric] - ideal).abs().groupby("model")
        gap = distance.mean()[rival] - distance.mean()[model]
        noise = max(distance.std()[model], distance.std()[rival])
        verdict = "win" if gap > noise else "loss" if -gap > noise else "tie (within seed sd)"
        verdicts.append(f"{metric}: {verdict}")
    return f"{model} vs {rival} over {len(summaries)} seeds: " + ", ".join(verdicts)


def data_argument_parser(description: str, seeds: list[int]) -> argparse.ArgumentParser:
    """A parser with the data options of the generation benchmarks: --datasets / --data + --label-key, --seeds,
    --recipe and --threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--datasets", nargs="+", default=None, choices=DATASETS,
                        help="bundled datasets (default: all of them unless --data is given)")
    parser.add_argument("--data", type=Path, help="any .h5ad of raw counts (with --label-key)")
    parser.add_argument("--label-key", help="obs column of the labels of --data")
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds, help="split and training seeds")
    parser.add_argument("--recipe", type=Path, default=ROOT / "training" / "configs" / "default.yaml")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (training and sampling)")
    return parser


def chosen_datasets(args: argparse.Namespace, load=load_dataset) -> dict:
    """`{name: () -> (counts, label column)}` of the parsed --datasets / --data; sets torch's thread count."""
    if (args.data is None) != (args.label_key is None):
        raise SystemExit("--data and --label-key go together: pass both, e.g. --data cells.h5ad --label-key cell_type")
    torch.set_num_threads(args.threads)
    datasets = {name: lambda name=name: load(name) for name in args.datasets or ([] if args.data else DATASETS)}
    if args.data:
        datasets[args.data.name] = lambda: (ad.read_h5ad(args.data), args.label_key)
    return datasets


def main() -> None:
    parser = data_argument_parser(__doc__.splitlines()[0], seeds=[0, 1, 2])
    parser.add_argument("--scvi-epochs", type=int, default=None, help="default: scvi-tools' heuristic + early stopping")
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--max-train-steps", type=int, default=None,
                        help="step cap of both scLDM stages (default: the recipe's)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    sections = []
    for name, load in chosen_datasets(args).items():
        cells, label_key = load()
        summaries = []
        start = time.perf_counter()
        for seed in args.seeds:
            train, floor, test = stratified_split(cells, label_key, fractions=(0.6, 0.2, 0.2), seed=seed)
            train, floor, test = variable_genes_of_training_cells((train, floor, test))
            overrides = {"num_threads": args.threads, "seed": seed}
            if args.max_train_steps:
                overrides["max_train_steps"] = args.max_train_steps
            with tempfile.TemporaryDirectory() as workdir:
                result = run_side_by_side(train, floor, test, label_key, args.recipe, workdir,
                                          guidance_scale=args.guidance_scale, scvi_epochs=args.scvi_epochs,
                                          seed=seed, recipe_overrides=overrides)
            summaries.append(result.summary)
        section = (
            f"### {name}: {cells.n_obs} cells x {cells.n_vars} genes, {train.n_obs}/{floor.n_obs}/{test.n_obs} "
            f"train/floor/test, seeds {args.seeds} ({time.perf_counter() - start:.0f} s)\n\n"
            f"Environment: {run_environment()}.\n\n"
            f"{seed_table(summaries).to_markdown()}\n\n{wins_beyond_noise(summaries)}\n"
        )
        print(section)
        sections.append(section)

    command = "python benchmarks/bench_generation.py " + " ".join(
        ([f"--datasets {' '.join(args.datasets)}"] if args.datasets else [])
        + ([f"--data {args.data} --label-key {args.label_key}"] if args.data else [])
        + [f"--seeds {' '.join(map(str, args.seeds))}", f"--recipe {args.recipe.relative_to(ROOT)}"]
        + ([f"--max-train-steps {args.max_train_steps}"] if args.max_train_steps else [])
    )
    with args.results.open("a") as results:
        results.write(f"\n## Generation side by side (bench_generation.py)\n\nCommand: `{command}`\n\n")
        results.write("\n".join(sections))


if __name__ == "__main__":
    main()
