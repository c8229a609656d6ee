"""Generation quality side by side: scLDM vs scVI vs a naive NB vs a second real sample (the floor).

For each dataset: a stratified 60/20/20 split (train / real floor / test, seed 0); every model trains on the train
cells and generates the test cells' label composition; `evaluate_generation` scores each against the test cells
(PCA fitted on the train cells). Prints one markdown table per dataset and appends them to benchmarks/RESULTS.md.

    python benchmarks/bench_generation.py                       # PBMC68k and Kang 2018 (../shared/data)
    python benchmarks/bench_generation.py --datasets pbmc68k    # one dataset
"""

import argparse
import tempfile
import time
from pathlib import Path

import anndata as ad
import pandas as pd

from scldm_hf.data import load_pbmc68k_counts
from scldm_hf.evaluation.side_by_side import run_side_by_side, stratified_split

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
COLUMNS = ["mmd_rbf", "wasserstein_2", "energy_distance", "nn_accuracy", "precision", "recall", "mean_pearson",
           "variance_pearson", "gene_correlation", "classifier_auroc", "cell_type_f1_generated", "wall_time_s"]


def load_dataset(name: str) -> tuple[ad.AnnData, str]:
    """`(counts, label column)`; labelled datasets only (the celltypist sample has no labels: not benchmarked)."""
    if name == "pbmc68k":
        return load_pbmc68k_counts(), "cell_type"
    if name == "kang2018":
        return ad.read_h5ad(SHARED / "kang2018_pbmc_ifnb_counts.h5ad"), "cell_type"
    raise SystemExit(f"unknown dataset {name!r}; choose pbmc68k or kang2018")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["pbmc68k", "kang2018"])
    parser.add_argument("--recipe", type=Path, default=ROOT / "training" / "configs" / "pbmc_demo.yaml")
    parser.add_argument("--scvi-epochs", type=int, default=200)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()

    sections = []
    for name in args.datasets:
        cells, label_key = load_dataset(name)
        train, floor, test = stratified_split(cells, label_key, fractions=(0.6, 0.2, 0.2), seed=0)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as workdir:
            result = run_side_by_side(train, floor, test, label_key, args.recipe, workdir,
                                      guidance_scale=args.guidance_scale, scvi_epochs=args.scvi_epochs)
        table = result.summary[[column for column in COLUMNS if column in result.summary]]
        section = (
            f"### {name}: {cells.n_obs} cells x {cells.n_vars} genes, {train.n_obs}/{floor.n_obs}/{test.n_obs} "
            f"train/floor/test ({time.perf_counter() - start:.0f} s)\n\n{table.round(3).to_markdown()}\n"
        )
        print(section)
        sections.append(section)

    command = "python benchmarks/bench_generation.py " + " ".join(
        f"--datasets {' '.join(args.datasets)}".split() + [f"--recipe {args.recipe.relative_to(ROOT)}"]
    )
    with args.results.open("a") as results:
        results.write(f"\n## Generation side by side (bench_generation.py)\n\nCommand: `{command}`\n\n")
        results.write("\n".join(sections))


if __name__ == "__main__":
    main()
