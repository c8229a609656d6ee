"""Which held-out score should stop the VAE: its NB loss or the MMD^2 of its round trips (validation cells only).

For each data set and seed: the diagnosis split (stratified 60/20/20 with that seed, `bench_diagnosis.py`) and the
2,000 most variable genes of its training cells. The recipe's VAE trains on the training cells to its step cap
without stopping, scoring its held-out 10% of them (inside the training cells) every ``validation_steps`` on both
early-stopping scores: ``validation_loss`` (held-out NB NLL per cell) and ``round_trip_mmd`` (MMD^2 of the held-out
cells' sampled round trips, PCA fitted on training cells). From the two logged curves it prints, for each criterion
and patience, the step early stopping would keep and both scores there, beside the last step (the full LR schedule).
The floor and test cells are never read, so a recipe can be chosen on this table.

Caveat printed with the table: the round-trip MMD^2 at a step kept by that same score is measured on the cells that
chose it (optimistic); at the NB-loss criterion's or the last step it is not.

    python benchmarks/bench_vae_stopping.py --datasets kang2018 --seeds 0
"""

import csv
import tempfile
from pathlib import Path

import pandas as pd
from bench_diagnosis import load_dataset, variable_genes_of_training_cells
from bench_generation import chosen_datasets, data_argument_parser

from scldm_hf.evaluation import ProtocolCardMetrics
from scldm_hf.training import VAETrainingConfig, load_config
from scldm_hf.training.trackers import METRICS_FILE
from scldm_hf.training.vae import train_vae
from scldm_hf.workflows.side_by_side import stratified_split

SCORES = ("validation_loss", "round_trip_mmd")
PATIENCES = (5, 10)


def kept_step(curve: dict[int, float], patience: int) -> tuple[int, int]:
    """`(kept step, stopping step)` of early stopping with `patience` checks replayed on `curve` `{step: score}`."""
    best_step, waited = None, 0
    for step in sorted(curve):
        if best_step is None or curve[step] < curve[best_step]:
            best_step, waited = step, 0
        else:
            waited += 1
            if waited >= patience:
                return best_step, step
    return best_step, max(curve)


def logged_curves(output_dir: Path) -> pd.DataFrame:
    """`[checks, SCORES]` held-out scores logged by the VAE run in `output_dir`, indexed by step."""
    with (output_dir / "logs" / METRICS_FILE).open() as file:
        rows = [row for row in csv.DictReader(file) if row["metric"] in SCORES]
    return pd.DataFrame(rows).astype({"step": int, "value": float}).pivot(index="step", columns="metric",
                                                                          values="value")[list(SCORES)]


def train_unstopped_vae(train, label_key: str, recipe: Path, seed: int, threads: int, workdir: Path) -> pd.DataFrame:
    """Train the recipe's VAE on `train` to its cap, both scores logged; returns `logged_curves`."""
    train_path = workdir / "train.h5ad"
    train.write_h5ad(train_path)
    config = load_config(VAETrainingConfig, recipe, {
        "data": str(train_path), "output_dir": str(workdir / "vae"), "covariates": [label_key], "seed": seed,
        "num_threads": threads}, section="vae")
    # scored at every check but never stopped (patience beyond the last check), one checkpoint at the end
    config.early_stopping_patience = config.max_train_steps // config.validation_steps + 1
    config.checkpointing_steps = config.max_train_steps
    train_vae(config, ProtocolCardMetrics())
    return logged_curves(workdir / "vae")


def stopping_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Per criterion and patience (and the last step): the kept step, where it stops, and both scores there."""
    rows = []
    for score in SCORES:
        for patience in PATIENCES:
            kept, stopped = kept_step(curves[score].to_dict(), patience)
            rows.append({"criterion": f"{score}, patience {patience}", "kept step": kept, "stops at": stopped,
                         **curves.loc[kept].to_dict()})
    last = curves.index.max()
    rows.append({"criterion": "no early stopping (last step)", "kept step": last, "stops at": last,
                 **curves.loc[last].to_dict()})
    return pd.DataFrame(rows).set_index("criterion")


def main() -> None:
    parser = data_argument_parser(__doc__.splitlines()[0], seeds=[0])
    args = parser.parse_args()
    for name, load in chosen_datasets(args, load_dataset).items():
        cells, label_key = load()
        for seed in args.seeds:
            train, _, _ = stratified_split(cells, label_key, fractions=(0.6, 0.2, 0.2), seed=seed)
            (train,) = variable_genes_of_training_cells((train,))
            with tempfile.TemporaryDirectory() as workdir:
                curves = train_unstopped_vae(train, label_key, args.recipe, seed, args.threads, Path(workdir))
            print(f"\n### {name}, seed {seed}: {train.n_obs} training cells x {train.n_vars} genes, "
                  f"recipe {args.recipe.name}\n")
            print(curves.round(4).to_markdown(), "\n")
            print(stopping_table(curves).round(4).to_markdown())
            print("\nround_trip_mmd at a step kept by round_trip_mmd is measured on the cells that chose it.")


if __name__ == "__main__":
    main()
