"""DiT recipe variants, chosen on validation cells: the same VAE, the DiT retrained with other options.

For each trained seed of a `bench_diagnosis.py` workdir (``WORKDIR/<dataset>/seed<k>/{vae,pipeline,train.h5ad}``) and
each variant (``--variant NAME OPTION=VALUE ...``, DiT recipe options, dotted for model options), the DiT is
retrained exactly as the seed's pipeline was (its saved ``training_config.yaml``: same seed, validation split, early
stopping and VAE) except for the variant's options, into ``WORKDIR/<dataset>/seed<k>/variants/<NAME>/pipeline``. The
variant ``recipe`` is the seed's own pipeline, not retrained. Every pipeline is scored on its own validation cells
(the training cells both stages held out):

- `bench_guidance.score_pipeline` at the protocol's sampling (guidance 1, 25 Euler steps): per label, the DiT's
  generated latents against the encoded validation cells in the VAE's standardised latent space (the DiT alone,
  without the decoder's count noise; the training cells' latents beside it), and the generated cells' count metrics;
- the best held-out flow-matching loss and the steps run.

Neither the diagnosis' floor nor its test cells are read, so a recipe can be chosen on this table.

    python benchmarks/bench_dit_recipe.py --workdir /work/diag --datasets kang2018 --seeds 0 1 2 \\
        --variant logit_normal timestep_sampling=logit_normal
"""

import json
import time
from pathlib import Path

import anndata as ad
import torch
import yaml
from bench_diagnosis import workdir_argument_parser
from bench_guidance import SCORE_COLUMNS, latent_cache_split, memorised_line, score_pipeline
from bench_library_size import mean_sd
from bench_stopping import logged_curves

from scldm_hf.evaluation import ProtocolCardMetrics
from scldm_hf.training import DiTTrainingConfig, load_config
from scldm_hf.training.dit import train_dit
from scldm_hf.training.hub import TRAINING_CONFIG_FILE

RECIPE = "recipe"
SCORES_FILE = "scores.json"
PROTOCOL_SAMPLING = (1.0, 25, "euler")  # guidance, steps, sampler


def parsed_variants(specs: list[list[str]]) -> dict[str, dict]:
    """``[[NAME, "option=value", ...], ...]`` -> ``{NAME: {option: value}}`` (values read as YAML)."""
    variants = {RECIPE: {}}
    for name, *options in specs:
        if name in variants or "=" in name:
            raise SystemExit(f"--variant {name!r}: give each variant a new name, then its OPTION=VALUE pairs.")
        variants[name] = {key: yaml.safe_load(value) for key, value in (option.split("=", 1) for option in options)}
    return variants


def train_variant(seed_dir: Path, options: dict, output_dir: Path) -> float:
    """Retrain the seed's DiT with `options` into `output_dir`; returns the wall time (s)."""
    saved = yaml.safe_load((seed_dir / "pipeline" / TRAINING_CONFIG_FILE).read_text())
    vae_dir = seed_dir / "vae"
    model = {f"model.{key}": value for key, value in saved.pop("model").items()}
    config = load_config(DiTTrainingConfig, overrides={
        **saved, **model, "data": str(vae_dir / "corpus"), "vae_name_or_path": str(vae_dir),
        "output_dir": str(output_dir), "resume_from_checkpoint": None, **options})
    start = time.perf_counter()
    train_dit(config, ProtocolCardMetrics())
    return time.perf_counter() - start


def scored_variant(seed_dir: Path, name: str, options: dict, train: ad.AnnData) -> dict:
    """The variant's scores on its validation cells, trained first where needed; kept in its ``scores.json``."""
    folder = seed_dir / "variants" / name
    scores_path = folder / SCORES_FILE
    if scores_path.is_file():
        return json.loads(scores_path.read_text())
    pipeline_dir = seed_dir / "pipeline" if name == RECIPE else folder / "pipeline"
    wall_s = None
    if name != RECIPE and not (pipeline_dir / "model_index.json").is_file():
        wall_s = train_variant(seed_dir, options, pipeline_dir)
    losses = logged_curves(pipeline_dir, ("validation_loss",))["validation_loss"]
    record = {"options": options, "wall_s": wall_s, "steps": int(losses.index.max()),
              "best_loss": float(losses.min()), "best_step": int(losses.idxmin()),
              "scores": score_pipeline(pipeline_dir, train, [PROTOCOL_SAMPLING])[PROTOCOL_SAMPLING]}
    folder.mkdir(parents=True, exist_ok=True)
    scores_path.write_text(json.dumps(record, indent=1))
    return record


def variants_table(records: dict[str, list[dict]]) -> str:
    """Markdown, one row per variant: mean ± sd over seeds of every score."""
    header = ["variant", "steps (best)", "held-out loss", *SCORE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, runs in records.items():
        steps = ", ".join(f"{run['steps']} ({run['best_step']})" for run in runs)
        scores = [mean_sd([run["scores"][column] for run in runs]) for column in SCORE_COLUMNS]
        lines.append("| " + " | ".join([name, steps, mean_sd([run["best_loss"] for run in runs]), *scores]) + " |")
    return "\n".join(lines) + "\n\n" + memorised_line([run["scores"] for run in records[RECIPE]])


def main() -> None:
    parser = workdir_argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME OPTION=VALUE",
                        help="a variant's name, then the DiT recipe options it changes (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = parsed_variants(args.variant)
    for dataset in args.datasets:
        records = {name: [] for name in variants}
        for seed in args.seeds:
            seed_dir = args.workdir / dataset / f"seed{seed}"
            train = ad.read_h5ad(seed_dir / "train.h5ad")
            for name, options in variants.items():
                print(f"{dataset} seed {seed} variant {name} {options}", flush=True)
                records[name].append(scored_variant(seed_dir, name, options, train))
        num_cells = len(latent_cache_split(args.workdir / dataset / f"seed{args.seeds[0]}" / "pipeline")[1])
        print(f"\n### {dataset}: validation cells of each pipeline ({num_cells} at seed {args.seeds[0]}), seeds "
              f"{args.seeds}, guidance 1, 25 steps\n\n{variants_table(records)}\n", flush=True)


if __name__ == "__main__":
    main()
