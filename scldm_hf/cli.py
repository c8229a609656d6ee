"""The ``scldm`` command line: convert, train, generate, evaluate.

Every ``SCLDMError`` is printed as one line (``error: ...``) with exit code 2; ``--debug`` shows the traceback.
"""

import argparse
import sys
from pathlib import Path

from scldm_hf.errors import ConfigurationError, InputDataError, SCLDMError


def _parse_conditions(pairs: list[str], num_cells: int) -> dict[str, list[str]] | None:
    """``["cell_type=B", "condition=stimulated"]`` -> ``{"cell_type": ["B"] * n, ...}``."""
    if not pairs:
        return None
    conditions = {}
    for pair in pairs:
        key, sep, label = pair.partition("=")
        if not sep or not key or not label:
            raise ConfigurationError(f"--condition {pair!r} is not KEY=LABEL; write e.g. --condition cell_type='CD14+ Monocyte'.")
        conditions[key] = [label] * num_cells
    return conditions


class _ArgumentParser(argparse.ArgumentParser):
    """Reports bad command lines as a ``ConfigurationError``, so they print as one ``error:`` line like any other."""

    def error(self, message: str):
        raise ConfigurationError(f"{message} (see `{self.prog} --help`)")


def _convert(args) -> str:
    from scldm_hf.data import anndata_to_corpus
    from scldm_hf.data.corpus import DEFAULT_MIN_VOCAB_OVERLAP
    from scldm_hf.loading import load_gene_vocab

    vocab = load_gene_vocab(args.vocab) if args.vocab else None
    min_overlap = DEFAULT_MIN_VOCAB_OVERLAP if args.min_vocab_overlap is None else args.min_vocab_overlap
    info = anndata_to_corpus(
        args.input, args.output_dir, vocab=vocab, covariates=args.covariate, layer=args.layer,
        min_vocab_overlap=min_overlap,
    )
    return f"corpus of {info.num_cells} cells x {len(info.measured_gene_ids)} genes written to {args.output_dir}"


def _generate(args) -> str:
    import torch

    from scldm_hf.loading import load_pipeline
    from scldm_hf.validation import check_guidance_scale, check_num_cells

    check_num_cells(args.num_cells)
    check_guidance_scale(args.guidance_scale, conditioned=[])
    if args.conditions_file and args.condition:
        raise ConfigurationError("pass either --condition KEY=LABEL or --conditions-file, not both.")
    conditions = (
        _read_conditions_file(args.conditions_file) if args.conditions_file
        else _parse_conditions(args.condition, args.num_cells)
    )
    pipe = load_pipeline(args.model)

    generator = torch.Generator().manual_seed(args.seed)
    output = pipe(
        conditions=conditions,
        num_cells=None if args.conditions_file else args.num_cells,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.steps,
        generator=generator,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    output.cells.write_h5ad(args.out)
    return f"{output.cells.n_obs} cells written to {args.out}"


def _read_conditions_file(path: str):
    """A CSV with a header of covariate names and one row of labels per cell to generate."""
    import pandas as pd

    if not Path(path).is_file():
        raise InputDataError(f"No conditions file at {path}: pass a CSV with one column per covariate, one row per cell.")
    conditions = pd.read_csv(path, dtype=str, keep_default_na=False)
    if conditions.empty:
        raise InputDataError(f"{path} has no rows: write one row of labels per cell to generate.")
    return conditions


def _read_h5ad(path: str, what: str):
    import anndata

    if not Path(path).is_file():
        raise InputDataError(f"No {what} .h5ad file at {path}: pass the path of an AnnData written with write_h5ad.")
    return anndata.read_h5ad(path)


def _evaluate(args) -> str:
    from scldm_hf.evaluation import evaluate_generation

    real = _read_h5ad(args.real, "real")
    generated = _read_h5ad(args.generated, "generated")
    table = evaluate_generation(real, generated, condition_key=args.condition_key)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out)
    print(table.to_string(float_format="{:.4g}".format))
    return f"metrics written to {args.out}"


def _train(args) -> str:
    from scldm_hf.training import run_training_script

    return run_training_script(args.stage, args.script_args, prog=f"scldm train {args.stage}")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="scldm", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    convert = add_command("convert", "h5ad/AnnData -> datasets corpus folder")
    convert.add_argument("input", help="an .h5ad file of raw integer counts")
    convert.add_argument("output_dir", help="the corpus folder to write (must not exist)")
    convert.add_argument("--covariate", action="append", default=[], help="obs column to keep (repeatable)")
    convert.add_argument("--layer", default=None, help="layer holding raw counts (None: X)")
    convert.add_argument("--vocab", default=None,
                         help="genes of a model: gene_vocab.json, or a saved VAE/pipeline folder")
    convert.add_argument("--min-vocab-overlap", type=float, default=None,
                         help="minimum fraction of vocabulary genes the data must measure (None: 0.01)")
    convert.set_defaults(run=_convert)

    train = commands.add_parser("train", help="train a stage; `scldm train <stage> --help` lists its "
                                "options (the same as training/train_<stage>.py)")
    train.add_argument("stage", choices=["vae", "dit", "finetune"],
                       help="vae (stage 1), dit (stage 2, saved as a pipeline) or finetune (a pipeline on new data)")
    train.add_argument("script_args", nargs=argparse.REMAINDER,
                       help="--config RECIPE.yaml and --name value options of the stage")
    train.set_defaults(run=_train)

    generate = add_command("generate", "generate cells with a saved SCLDMPipeline into an .h5ad file")
    generate.add_argument("model", help="pipeline folder or Hub repo id (from the local cache)")
    generate.add_argument("--condition", action="append", default=[],
                          help="KEY=LABEL, the label of every generated cell for covariate KEY (repeatable)")
    generate.add_argument("--conditions-file", help="CSV, one column per covariate and one row per cell (e.g. real "
                          "cells' obs): generates one cell per row, replacing --condition and --num-cells")
    generate.add_argument("--num-cells", type=int, default=100, help="number of cells to generate")
    generate.add_argument("--guidance-scale", type=float, default=1.0,
                          help="classifier-free guidance scale (1: conditional model only, >1: stronger conditioning)")
    generate.add_argument("--steps", type=int, default=25, help="flow-matching sampling steps")
    generate.add_argument("--seed", type=int, default=0, help="seed of the torch.Generator (noise and library sizes)")
    generate.add_argument("--out", default="generated.h5ad", help="output .h5ad (counts in X, conditions in obs)")
    generate.set_defaults(run=_generate)

    evaluate = add_command("evaluate", "compare generated with real cells per condition (MMD, W1, 1-NN, ...)")
    evaluate.add_argument("real", help=".h5ad of real cells (raw counts)")
    evaluate.add_argument("generated", help=".h5ad of generated cells (e.g. from scldm generate)")
    evaluate.add_argument("--condition-key", required=True, help="obs column the cells are grouped by")
    evaluate.add_argument("--out", default="metrics.csv", help="CSV of the metrics, one row per condition")
    evaluate.set_defaults(run=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        print(args.run(args))
    except SCLDMError as error:
        if args is not None and args.debug:
            raise
        print("error:", " ".join(str(error).split()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
