"""Which held-out score should stop a stage: its training loss or a distance of its outputs to real cells.

For each data set and seed: the diagnosis split (stratified 60/20/20 with that seed, `bench_diagnosis.py`) and the
2,000 most variable genes of its training cells. The stage trains on the training cells to its step cap without
stopping, scoring its held-out 10% of them (inside the training cells) every ``validation_steps`` on both of its
early-stopping scores:

- ``--stage vae``: the recipe's VAE; ``validation_loss`` (held-out NB NLL per cell) and ``round_trip_mmd`` (MMD^2 of
  the held-out cells' sampled round trips).
- ``--stage dit``: the recipe's DiT on the latents of the recipe's (early-stopped) VAE, trained here or taken from a
  `bench_diagnosis.py` workdir (``--vae-from``, same split); ``validation_loss`` (held-out flow-matching loss) and
  ``generation_mmd`` (MMD^2 of the held-out cells and cells generated for their labels). ``--dit-max-steps`` raises
  the cap (the learning-rate schedule spans the cap).

Distances are in a PCA fitted on training cells. From the two logged curves it prints, for each criterion and
patience, the step early stopping would keep and both scores there, beside the last step. The floor and test cells
are never read, so a recipe can be chosen on this table.

Caveat printed with the table: a distance at a step kept by that same distance is measured on the cells that chose it
(optimistic); at the loss criterion's or the last step it is not.

    python benchmarks/bench_stopping.py --stage vae --datasets kang2018 --seeds 0
    python benchmarks/bench_stopping.py --stage dit --datasets kang2018 --seeds 0 --vae-from /work/diag --dit-max-steps 6000
"""

import csv
import tempfile
from pathlib import Path

import anndata as ad
import pandas as pd
from bench_diagnosis import given, load_dataset, variable_genes_of_training_cells
from bench_generation import chosen_datasets, data_argument_parser

from scldm_hf.evaluation import ProtocolCardMetrics
from scldm_hf.training import DiTTrainingConfig, TrainingConfig, VAETrainingConfig, load_config
from scldm_hf.training.dit import train_dit
from scldm_hf.training.trackers import METRICS_FILE
from scldm_hf.training.vae import train_vae
from scldm_hf.workflows.side_by_side import stratified_split

SCORES = {"vae": ("validation_loss", "round_trip_mmd"), "dit": ("validation_loss", "generation_mmd")}
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


def logged_curves(output_dir: Path, scores: tuple[str, ...]) -> pd.DataFrame:
    """`[checks, scores]` held-out scores logged by the run in `output_dir`, indexed by step."""
    with (output_dir / "logs" / METRICS_FILE).open() as file:
        rows = [row for row in csv.DictReader(file) if row["metric"] in scores]
    return pd.DataFrame(rows).astype({"step": int, "value": float}).pivot(index="step", columns="metric",
                                                                          values="value")[list(scores)]


def unstopped(config: TrainingConfig) -> TrainingConfig:
    """`config` scored at every check but never stopped (patience beyond the last check), one checkpoint at the end."""
    config.early_stopping_patience = config.max_train_steps // config.validation_steps + 1
    config.checkpointing_steps = config.max_train_steps
    return config


def trained_vae(train: ad.AnnData, vae_from: Path | None, vae_config: VAETrainingConfig) -> Path:
    """The recipe's VAE of these training cells: `vae_from` (checked to be trained on the same cells) or trained."""
    if vae_from is None:
        train_vae(vae_config, ProtocolCardMetrics())
        return Path(vae_config.output_dir)
    trained_on = ad.read_h5ad(vae_from.parent / "train.h5ad", backed="r")
    if not trained_on.obs_names.equals(train.obs_names) or not trained_on.var_names.equals(train.var_names):
        raise SystemExit(f"{vae_from} was trained on other cells or genes than this split's training cells.")
    return vae_from


def train_unstopped_stage(stage: str, train: ad.AnnData, label_key: str, args, seed: int, workdir: Path,
                          vae_from: Path | None) -> pd.DataFrame:
    """Train `stage` on `train` to its cap, both of its scores logged; returns `logged_curves`."""
    train_path = workdir / "train.h5ad"
    train.write_h5ad(train_path)
    shared = {"covariates": [label_key], "seed": seed, "num_threads": args.threads}
    vae_config = load_config(VAETrainingConfig, args.recipe, {
        **shared, "data": str(train_path), "output_dir": str(workdir / "vae")}, section="vae")
    if stage == "vae":
        train_vae(unstopped(vae_config), ProtocolCardMetrics())
        return logged_curves(workdir / "vae", SCORES[stage])
    vae_dir = trained_vae(train, vae_from, vae_config)
    dit_config = load_config(DiTTrainingConfig, args.recipe, {
        **shared, "data": str(vae_dir / "corpus"), "vae_name_or_path": str(vae_dir),
        "output_dir": str(workdir / "pipeline"), "num_eval_cells": 0, **given(max_train_steps=args.dit_max_steps)},
        section="dit")
    dit_config.early_stopping_metric = "generation_mmd"  # scored only when watched; the loss is always scored
    train_dit(unstopped(dit_config), ProtocolCardMetrics())
    return logged_curves(workdir / "pipeline", SCORES[stage])


def stopping_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Per criterion and patience (and the last step): the kept step, where it stops, and both scores there."""
    rows = []
    for score in curves.columns:
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
    parser.add_argument("--stage", choices=sorted(SCORES), default="vae")
    parser.add_argument("--vae-from", type=Path, default=None,
                        help="--stage dit: a bench_diagnosis.py --workdir whose <dataset>/seed<k>/vae to reuse")
    parser.add_argument("--dit-max-steps", type=int, help="--stage dit: the DiT's step cap (default: the recipe's)")
    args = parser.parse_args()
    for name, load in chosen_datasets(args, load_dataset).items():
        cells, label_key = load()
        for seed in args.seeds:
            train, _, _ = stratified_split(cells, label_key, fractions=(0.6, 0.2, 0.2), seed=seed)
            (train,) = variable_genes_of_training_cells((train,))
            vae_from = None if args.vae_from is None else args.vae_from / name / f"seed{seed}" / "vae"
            with tempfile.TemporaryDirectory() as workdir:
                curves = train_unstopped_stage(args.stage, train, label_key, args, seed, Path(workdir), vae_from)
            print(f"\n### {args.stage}, {name}, seed {seed}: {train.n_obs} training cells x {train.n_vars} genes, "
                  f"recipe {args.recipe.name}\n")
            print(curves.round(4).to_markdown(), "\n")
            print(stopping_table(curves).round(4).to_markdown())
            print(f"\n{curves.columns[1]} at a step kept by {curves.columns[1]} is measured on the cells that chose it.")


if __name__ == "__main__":
    main()
