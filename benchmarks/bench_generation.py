"""Generation quality side by side: scLDM vs scVI vs a naive NB vs a second real sample (the floor).

For each dataset: a stratified 60/20/20 split (train / real floor / test, seed 0); every model trains on the train
cells and generates the test cells' label composition; `evaluate_generation` scores each against the test cells
(PCA fitted on the train cells). Prints one markdown table per dataset and appends them to benchmarks/RESULTS.md.

Datasets: PBMC68k (765 genes, 10 cell types) and every real dataset in ../shared/data, reduced to their 2,000 most
variable genes (Seurat v3 on the counts of all cells, CFGen's protocol): Kang 2018 (7 cell types, control and
IFN-beta cells pooled per type) and the celltypist sample, which ships without labels: its conditions are 5 k-means
clusters of the log-normalised cells (30 PCs).

    python benchmarks/bench_generation.py                       # all datasets
    python benchmarks/bench_generation.py --datasets pbmc68k    # one dataset
"""

import argparse
import tempfile
import time
from pathlib import Path

import anndata as ad
import scanpy as sc
import torch
from sklearn.cluster import KMeans

from scldm_hf.data import load_pbmc68k_counts
from scldm_hf.evaluation import fit_real_pca, log_normalize
from scldm_hf.evaluation.side_by_side import run_side_by_side, stratified_split

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
COLUMNS = ["mmd_rbf", "wasserstein_2", "energy_distance", "nn_accuracy", "precision", "recall", "mean_pearson",
           "variance_pearson", "gene_correlation", "gene_correlation_all_cells", "classifier_auroc",
           "cell_type_f1_generated", "wall_time_s"]


DATASETS = ("pbmc68k", "kang2018", "celltypist")
NUM_VARIABLE_GENES = 2000
NUM_CLUSTERS = 5


def most_variable_genes(cells: ad.AnnData, num_genes: int = NUM_VARIABLE_GENES) -> ad.AnnData:
    """`cells` restricted to their `num_genes` most variable genes (Seurat v3 on counts)."""
    variable = sc.pp.highly_variable_genes(cells, n_top_genes=num_genes, flavor="seurat_v3", inplace=False)
    return cells[:, variable["highly_variable"].to_numpy()].copy()


def read_shared(file_name: str) -> ad.AnnData:
    path = SHARED / file_name
    if not path.is_file():
        raise SystemExit(f"{path} not found: bench_generation reads the real datasets from ../shared/data.")
    return ad.read_h5ad(path)


def load_dataset(name: str) -> tuple[ad.AnnData, str]:
    """`(counts, label column)` of a benchmark dataset."""
    if name == "pbmc68k":
        return load_pbmc68k_counts(), "cell_type"
    if name == "kang2018":
        return most_variable_genes(read_shared("kang2018_pbmc_ifnb_counts.h5ad")), "cell_type"
    if name == "celltypist":
        cells = most_variable_genes(read_shared("celltypist_sample_counts.h5ad"))
        expression = log_normalize(cells.X)
        pcs = fit_real_pca(expression).transform(expression)
        clusters = KMeans(NUM_CLUSTERS, n_init=10, random_state=0).fit_predict(pcs)
        cells.obs["cluster"] = [f"cluster {index}" for index in clusters]
        return cells, "cluster"
    raise SystemExit(f"unknown dataset {name!r}; choose from {DATASETS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--recipe", type=Path, default=ROOT / "training" / "configs" / "pbmc_demo.yaml")
    parser.add_argument("--scvi-epochs", type=int, default=200)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (training and sampling)")
    parser.add_argument("--max-train-steps", type=int, default=None,
                        help="steps of both scLDM stages (default: the recipe's, VAE 900 and DiT 2000)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    overrides = {"num_threads": args.threads}
    if args.max_train_steps:
        overrides["max_train_steps"] = args.max_train_steps
    sections = []
    for name in args.datasets:
        cells, label_key = load_dataset(name)
        train, floor, test = stratified_split(cells, label_key, fractions=(0.6, 0.2, 0.2), seed=0)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as workdir:
            result = run_side_by_side(train, floor, test, label_key, args.recipe, workdir,
                                      guidance_scale=args.guidance_scale, scvi_epochs=args.scvi_epochs,
                                      recipe_overrides=overrides)
        table = result.summary[[column for column in COLUMNS if column in result.summary]]
        section = (
            f"### {name}: {cells.n_obs} cells x {cells.n_vars} genes, {train.n_obs}/{floor.n_obs}/{test.n_obs} "
            f"train/floor/test ({time.perf_counter() - start:.0f} s)\n\n{table.round(3).to_markdown()}\n"
        )
        print(section)
        sections.append(section)

    command = "python benchmarks/bench_generation.py " + " ".join(
        f"--datasets {' '.join(args.datasets)}".split() + [f"--recipe {args.recipe.relative_to(ROOT)}"]
        + ([f"--max-train-steps {args.max_train_steps}"] if args.max_train_steps else [])
    )
    with args.results.open("a") as results:
        results.write(f"\n## Generation side by side (bench_generation.py)\n\nCommand: `{command}`\n\n")
        results.write("\n".join(sections))


if __name__ == "__main__":
    main()
