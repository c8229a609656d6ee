"""The ``scldm`` command line: convert, convert-atlas, convert-original, push-corpus, train, generate, evaluate.

Every ``SCLDMError`` (and any ``OSError`` of a path the file system refuses) is printed as one line (``error: ...``)
with exit code 2; ``--debug`` shows the traceback.
"""

import argparse
import os
import sys
from pathlib import Path

from scldm_hf.errors import ConfigurationError, InputDataError, SCLDMError


def _parse_conditions(pairs: list[str]) -> dict[str, str] | None:
    """``["cell_type=B", "condition=stimulated"]`` -> ``{"cell_type": "B", "condition": "stimulated"}``."""
    if not pairs:
        return None
    conditions = {}
    for pair in pairs:
        key, sep, label = pair.partition("=")
        if not sep or not key or not label:
            raise ConfigurationError(f"--condition {pair!r} is not KEY=LABEL; write e.g. --condition cell_type='CD14+ Monocyte'.")
        if key in conditions:
            raise ConfigurationError(
                f"--condition {key}=... is given twice ({conditions[key]!r} and {label!r}): give each covariate once, "
                "or use --conditions-file for cells of several labels."
            )
        conditions[key] = label
    return conditions


def _check_output_path(path: str, overwrite: bool, option: str = "--out") -> Path:
    """Refuse, before any work, an output that exists (without --overwrite) or cannot be written."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigurationError(f"{path} already exists: choose another {option}, or pass --overwrite to replace it.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigurationError(f"cannot create the folder of {path} ({error.strerror}): choose another {option}.") from error
    if not os.access(path.parent, os.W_OK):
        raise ConfigurationError(f"{path.parent} is not writable: choose another {option}.")
    return path


class _ArgumentParser(argparse.ArgumentParser):
    """Reports bad command lines as a ``ConfigurationError``, so they print as one ``error:`` line like any other."""

    def error(self, message: str):
        raise ConfigurationError(f"{message} (see `{self.prog} --help`)")


def _convert(args) -> str:
    from scldm_hf.data import anndata_to_corpus
    from scldm_hf.data.corpus import DEFAULT_MIN_VOCAB_OVERLAP
    from scldm_hf.loading import load_gene_vocab

    _check_output_path(args.output_dir, args.overwrite, option="output_dir")
    vocab = load_gene_vocab(args.vocab) if args.vocab else None
    min_overlap = DEFAULT_MIN_VOCAB_OVERLAP if args.min_vocab_overlap is None else args.min_vocab_overlap
    info = anndata_to_corpus(
        args.input, args.output_dir, vocab=vocab, covariates=args.covariate, layer=args.layer,
        min_vocab_overlap=min_overlap, overwrite=args.overwrite,
    )
    return f"corpus of {info.num_cells} cells x {len(info.measured_gene_ids)} genes written to {args.output_dir}"


def _convert_atlas(args) -> str:
    from dataclasses import fields

    from scldm_hf.data.atlas import TokenValueLayout, token_values_to_corpus

    _check_output_path(args.output_dir, args.overwrite, option="output_dir")  # before reading any of the repo
    layout = TokenValueLayout(**{field.name: getattr(args, field.name) for field in fields(TokenValueLayout)})
    info = token_values_to_corpus(args.repo_id, args.output_dir, covariates=args.covariate, layout=layout,
                                  revision=args.revision, overwrite=args.overwrite)
    return f"corpus of {info.num_cells} cells x {len(info.genes)} genes written to {args.output_dir}"


def _generate(args) -> str:
    import torch

    from scldm_hf.loading import load_pipeline
    from scldm_hf.pipelines.streaming import generate_to_file
    from scldm_hf.validation import check_guidance_scale, check_num_cells

    check_num_cells(args.num_cells)
    check_guidance_scale(args.guidance_scale, conditioned=[])
    if args.conditions_file and args.condition:
        raise ConfigurationError("pass either --condition KEY=LABEL or --conditions-file, not both.")
    out = _check_output_path(args.out, args.overwrite)
    conditions = _read_conditions_file(args.conditions_file) if args.conditions_file else _parse_conditions(args.condition)
    pipe = load_pipeline(args.model, revision=args.revision)
    num_cells = generate_to_file(
        pipe,
        out,
        overwrite=args.overwrite,
        conditions=conditions,
        num_cells=None if args.conditions_file else args.num_cells,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.steps,
        generator=torch.Generator().manual_seed(args.seed),
        batch_size=args.batch_size,
    )
    return f"{num_cells} cells written to {out}"


def _read_conditions_file(path: str):
    """A CSV with a header of covariate names and one row of labels per cell to generate."""
    import pandas as pd

    if not Path(path).is_file():
        raise InputDataError(f"No conditions file at {path}: pass a CSV with one column per covariate, one row per cell.")
    try:
        conditions = pd.read_csv(path, dtype=str, keep_default_na=False)
    except ValueError as error:  # pandas' EmptyDataError/ParserError, UnicodeDecodeError
        raise InputDataError(f"{path} cannot be read as CSV ({type(error).__name__}: {error}): write a UTF-8 CSV "
                             "with a header of covariate names and one row of labels per cell.") from error
    if conditions.empty:
        raise InputDataError(f"{path} has no rows: write one row of labels per cell to generate.")
    return conditions


def _read_h5ad(path: str, what: str):
    """The AnnData at `path`, with unique gene names."""
    import anndata

    from scldm_hf.data.corpus import H5AD_REWRITE_FIX
    from scldm_hf.validation import check_unique_var_names

    if not Path(path).is_file():
        raise InputDataError(f"No {what} .h5ad file at {path}: pass the path of an AnnData written with write_h5ad.")
    try:
        adata = anndata.read_h5ad(path)
    except Exception as error:  # h5py/anndata raise OSError, KeyError, ... on truncated or foreign files
        raise InputDataError(
            f"The {what} file {path} cannot be read as .h5ad ({type(error).__name__}: {error}); {H5AD_REWRITE_FIX}."
        ) from error
    try:
        check_unique_var_names(adata.var_names)
    except InputDataError as error:
        raise InputDataError(f"In the {what} file {path}: {error}") from None
    return adata


def _evaluate(args) -> str:
    from scldm_hf.evaluation import evaluate_generation, format_evaluation

    out = _check_output_path(args.out, args.overwrite)
    if args.reference is None and not args.allow_biased_reference:
        raise ConfigurationError(
            "scldm evaluate needs --reference TRAIN.h5ad (the training cells: the PCA is fitted on cells that are "
            "neither real nor generated); --allow-biased-reference fits it on the real cells instead (biased)."
        )
    table = evaluate_generation(
        _read_h5ad(args.real, "real"), _read_h5ad(args.generated, "generated"), condition_key=args.condition_key,
        reference=_read_h5ad(args.reference, "reference") if args.reference else None,
        real_floor=_read_h5ad(args.real_floor, "real floor") if args.real_floor else None,
        allow_biased_reference=args.allow_biased_reference, min_cells=args.min_cells, seed=args.seed,
        layer=args.layer,
    )
    table.to_csv(out)
    print(format_evaluation(table))
    return f"metrics written to {args.out}"


def _convert_original(args) -> str:
    from scldm_hf.conversion.convert_original import convert_original_checkpoint

    output = convert_original_checkpoint(
        args.checkpoint, args.config, args.output, size_factors=args.size_factors, anndata=args.anndata,
        use_ema=not args.no_ema, base_model=args.base_model,
    )
    return f"converted {args.checkpoint} into {output}"


def _push_corpus(args) -> str:
    from scldm_hf.data.hub import push_corpus_to_hub

    url = push_corpus_to_hub(args.corpus_dir, args.repo_id, private=args.private)
    return f"corpus {args.corpus_dir} pushed to {url}"


def _train(args) -> str:
    from scldm_hf.workflows import run_stage

    return run_stage(args.stage, args.script_args, prog=f"scldm train {args.stage}")


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
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    convert.set_defaults(run=_convert)

    atlas = add_command("convert-atlas", "Hub atlas of token/value rows + gene table (Tahoe-100M, scGPT layout) -> "
                        "datasets corpus folder")
    atlas.add_argument("repo_id", help="the Hub dataset repo, e.g. tahoebio/Tahoe-100M (from the cache when offline), "
                       "or a local copy of one")
    atlas.add_argument("output_dir", help="the corpus folder to write (must not exist)")
    atlas.add_argument("--covariate", action="append", default=[], help="cell annotation column to keep (repeatable)")
    atlas.add_argument("--revision", default=None, help="Hub branch, tag or commit of the repo (None: main)")
    atlas.add_argument("--expression-config", default="expression_data",
                       help="dataset config (dataset card `configs`) of the cell rows")
    atlas.add_argument("--gene-config", default="gene_metadata", help="dataset config of the gene table")
    atlas.add_argument("--token-column", default="genes", help="cell column of gene token ids (list of int)")
    atlas.add_argument("--value-column", default="expressions", help="cell column of their raw counts (list)")
    atlas.add_argument("--gene-token-column", default="token_id", help="gene table column of the token ids")
    atlas.add_argument("--gene-name-column", default="gene_symbol",
                       help="gene table column naming the genes of the corpus (e.g. ensembl_id)")
    atlas.add_argument("--cell-id-column", default=None,
                       help="cell column of unique cell ids, e.g. BARCODE_SUB_LIB_ID (None: row numbers)")
    atlas.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    atlas.set_defaults(run=_convert_atlas)

    original = add_command("convert-original", "released scLDM .ckpt + Hydra .yaml -> SCLDMPipeline folder")
    original.add_argument("checkpoint", help="Lightning .ckpt (or .safetensors) of the released model")
    original.add_argument("--config", required=True, help="the Hydra .yaml released with the checkpoint")
    original.add_argument("--size-factors", nargs=2, metavar=("MU.pkl", "SD.pkl"),
                          help="log size-factor mean and sd pickles (plain dicts)")
    original.add_argument("--anndata", help="training .h5ad, for gene and label names (default: ids)")
    original.add_argument("--no-ema", action="store_true", help="take the online DiT weights, not the EMA ones")
    original.add_argument("--base-model", help="Hub id recorded as base_model in the card, e.g. biohub/scldm_cd4")
    original.add_argument("--output", required=True, help="folder to write the pipeline to")
    original.set_defaults(run=_convert_original)

    push_corpus = add_command("push-corpus", "upload a corpus folder as a Hub dataset repo (train with --data REPO_ID)")
    push_corpus.add_argument("corpus_dir", help="a corpus folder written by `scldm convert`")
    push_corpus.add_argument("repo_id", help="the Hub dataset repo to create or update, e.g. you/pbmc-cells")
    push_corpus.add_argument("--private", action="store_true", help="create the repo as private")
    push_corpus.set_defaults(run=_push_corpus)

    train = commands.add_parser("train", help="train a stage; `scldm train <stage> --help` lists its "
                                "options (the same as training/train_<stage>.py)")
    train.add_argument("stage", choices=["vae", "dit", "finetune"],
                       help="vae (stage 1), dit (stage 2, saved as a pipeline) or finetune (a pipeline on new data)")
    train.add_argument("script_args", nargs=argparse.REMAINDER,
                       help="--config RECIPE.yaml and --name value options of the stage")
    train.set_defaults(run=_train)

    generate = add_command("generate", "generate cells with a saved SCLDMPipeline into an .h5ad file")
    generate.add_argument("model", help="pipeline folder or Hub repo id (from the local cache)")
    generate.add_argument("--revision", default=None, help="Hub branch, tag or commit of a repo id (None: main)")
    generate.add_argument("--condition", action="append", default=[],
                          help="KEY=LABEL, the label of every generated cell for covariate KEY (repeatable)")
    generate.add_argument("--conditions-file", help="CSV, one column per covariate and one row per cell (e.g. real "
                          "cells' obs): generates one cell per row, replacing --condition and --num-cells")
    generate.add_argument("--num-cells", type=int, default=100, help="number of cells to generate")
    generate.add_argument("--guidance-scale", type=float, default=1.0,
                          help="classifier-free guidance scale (1: conditional model only, >1: stronger conditioning)")
    generate.add_argument("--steps", type=int, default=25, help="flow-matching sampling steps")
    generate.add_argument("--seed", type=int, default=0, help="seed of the torch.Generator (noise and library sizes)")
    generate.add_argument("--batch-size", type=int, default=256, help="cells generated and written at once")
    generate.add_argument("--out", default="generated.h5ad",
                          help="an .h5ad file (counts in X, conditions in obs), or a folder for a datasets corpus "
                               "(Arrow shards, flat memory); both are written batch by batch")
    generate.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    generate.set_defaults(run=_generate)

    evaluate = add_command(
        "evaluate", "compare generated with real cells per label (PCA fitted on --reference, real floor beside each "
        "score)")
    evaluate.add_argument("real", help="real held-out cells (.h5ad of counts)")
    evaluate.add_argument("generated", help="generated cells (.h5ad of counts over the same genes)")
    evaluate.add_argument("--condition-key", required=True, help="obs column of the labels compared one by one")
    evaluate.add_argument("--reference", help="cells the normalisation and PCA are fitted on: the training cells "
                          "(neither real nor generated); required unless --allow-biased-reference")
    evaluate.add_argument("--real-floor", help="a second real sample for the real-vs-real floor (None: the real "
                          "cells split in half per label)")
    evaluate.add_argument("--min-cells", type=int, default=10, help="labels with fewer comparable cells are pooled "
                          "into one 'other (k labels)' group")
    evaluate.add_argument("--allow-biased-reference", action="store_true",
                          help="fit the PCA on the real cells when no --reference is given (scores flagged BIASED)")
    evaluate.add_argument("--layer", default=None, help="layer of the real, reference and real-floor files holding "
                          "raw counts (None: X; generated cells' counts are read from X, where scldm generate puts them)")
    evaluate.add_argument("--seed", type=int, default=0, help="seeds the subsampling, floor split and classifiers")
    evaluate.add_argument("--out", default="metrics.csv", help="CSV of the metrics table")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    evaluate.set_defaults(run=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        print(args.run(args))
    except (SCLDMError, OSError) as error:  # OSError not raised by scldm-hf: a path the file system refuses
        if args is not None and args.debug:
            raise
        message = str(error) if isinstance(error, SCLDMError) else f"{error}; check the paths given and their permissions"
        print("error:", " ".join(message.split()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
