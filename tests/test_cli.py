"""The `scldm` command line: every command end to end on 120 real PBMC cells, and every error as one line.

The happy path is one chain (convert -> train vae -> train dit -> generate -> evaluate) built once per module with
`training/configs/tiny.yaml` cut to 2 steps; each command has its own test of what it wrote.
"""

import re
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from scldm_hf.cli import build_parser, main
from scldm_hf.data import GeneVocab, load_corpus
from scldm_hf.errors import ConfigurationError
from scldm_hf.loading import load_pipeline, load_vae
from scldm_hf.training import STAGES, RecipeParser
from scldm_hf.training.hub import PUSH_IGNORE_PATTERNS

from test_reliability import MALFORMED, MALFORMED_IDS, PICKLE_SUFFIXES

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "tiny.yaml"
SCLDM = Path(sys.executable).parent / "scldm"
NUM_CELLS = 120
CELL_TYPE, OTHER_CELL_TYPE = "Dendritic", "CD14+ Monocyte"  # 44 and 22 of the first 120 cells
TWO_STEPS = ["--max_train_steps", "2", "--checkpointing_steps", "2", "--logging_steps", "1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_ok(argv: list[str], capsys) -> str:
    """Run `scldm argv` in-process; it must exit 0. Returns stdout."""
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def run_error(argv: list[str], capsys) -> str:
    """Run `scldm argv` in-process; it must exit 2 with one `error: ...` line on stderr. Returns that line."""
    code = main([str(arg) for arg in argv])
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert stderr.endswith(lines[0] + "\n"), stderr  # the message is a single line
    return lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, pbmc_counts) -> Path:
    """Folder holding `real.h5ad` (the first 120 PBMC cells)."""
    root = tmp_path_factory.mktemp("cli")
    pbmc_counts[:NUM_CELLS].copy().write_h5ad(root / "real.h5ad")
    return root


@pytest.fixture(scope="module")
def corpus(workdir) -> Path:
    assert main(["convert", str(workdir / "real.h5ad"), str(workdir / "corpus"), "--covariate", "cell_type"]) == 0
    return workdir / "corpus"


@pytest.fixture(scope="module")
def trained(workdir, corpus) -> Path:
    """`scldm train vae` then `scldm train dit` for 2 steps each; returns the pipeline folder."""
    vae, pipeline = workdir / "vae", workdir / "pipeline"
    assert main(["train", "vae", "--config", str(TINY), "--data", str(corpus), "--output_dir", str(vae),
                 *TWO_STEPS]) == 0
    assert main(["train", "dit", "--config", str(TINY), "--data", str(corpus), "--vae_name_or_path", str(vae),
                 "--output_dir", str(pipeline), *TWO_STEPS]) == 0
    return pipeline


def generate_args(pipeline: Path, out: Path, cell_type: str = CELL_TYPE) -> list:
    return ["generate", pipeline, "--condition", f"cell_type={cell_type}", "--num-cells", 12, "--steps", 2,
            "--out", out]


@pytest.fixture(scope="module")
def generated(trained, workdir) -> Path:
    """12 generated cells of each of two cell types (one `scldm generate` run per cell type), concatenated."""
    runs = []
    for cell_type in (CELL_TYPE, OTHER_CELL_TYPE):
        out = workdir / f"generated_{len(runs)}.h5ad"
        assert main([str(arg) for arg in generate_args(trained, out, cell_type)]) == 0
        runs.append(ad.read_h5ad(out))
    ad.concat(runs, index_unique="-").write_h5ad(workdir / "generated.h5ad")
    return workdir / "generated.h5ad"


# --- Happy paths ---


def test_convert_writes_the_cells_of_the_h5ad(corpus, workdir):
    dataset, info = load_corpus(corpus)
    real = ad.read_h5ad(workdir / "real.h5ad")
    assert info.num_cells == len(dataset) == NUM_CELLS and info.covariates["cell_type"][0] == "CD14+ Monocyte"
    first = dataset[0]
    row = real.X[0].toarray().ravel()
    vocab = GeneVocab(info.genes)
    np.testing.assert_array_equal(row[real.var_names.get_indexer(vocab.genes_of(first["gene_ids"]))], first["counts"])
    assert first["library_size"] == row.sum()


def test_convert_maps_onto_a_model_vocabulary(trained, workdir, capsys):
    out = run_ok(["convert", workdir / "real.h5ad", workdir / "mapped", "--vocab", trained], capsys)
    assert f"corpus of {NUM_CELLS} cells x 765 genes" in out
    assert load_corpus(workdir / "mapped")[1].genes == load_vae(trained / "vae").config.gene_names


def test_train_writes_loadable_safetensors_folders(trained, workdir):
    vae = load_vae(workdir / "vae")
    pipe = load_pipeline(trained)
    assert pipe.vae.config.gene_names == vae.config.gene_names
    assert pipe.conditioner.config.covariate_labels["cell_type"][-1] == CELL_TYPE
    published = [
        path.relative_to(trained).as_posix() for path in trained.rglob("*")
        if path.is_file() and not any(fnmatch(path.relative_to(trained).as_posix(), p) for p in PUSH_IGNORE_PATTERNS)
    ]
    assert "README.md" in published and "transformer/diffusion_pytorch_model.safetensors" in published
    assert not {Path(path).suffix for path in published} & PICKLE_SUFFIXES, published


def test_generate_writes_reproducible_integer_cells(generated, trained, workdir, capsys):
    cells = ad.read_h5ad(generated)[:12]
    assert cells.shape == (12, 765) and np.issubdtype(cells.X.dtype, np.integer)
    assert set(cells.obs["cell_type"]) == {CELL_TYPE}
    run_ok(generate_args(trained, workdir / "again.h5ad"), capsys)
    assert (ad.read_h5ad(workdir / "again.h5ad").X != cells.X).nnz == 0


def test_generate_from_a_conditions_file_makes_one_cell_per_row(trained, workdir, capsys):
    labels = [CELL_TYPE, OTHER_CELL_TYPE, CELL_TYPE]
    pd.DataFrame({"cell_type": labels}).to_csv(workdir / "labels.csv", index=False)
    out = workdir / "from_file.h5ad"
    run_ok(["generate", trained, "--conditions-file", workdir / "labels.csv", "--steps", 2, "--out", out], capsys)
    assert list(ad.read_h5ad(out).obs["cell_type"]) == labels
    assert "not both" in run_error(
        ["generate", trained, "--conditions-file", workdir / "labels.csv", "--condition", f"cell_type={CELL_TYPE}"],
        capsys,
    )
    pd.DataFrame({"cell_type": ["no such type"]}).to_csv(workdir / "unknown.csv", index=False)
    assert "no such type" in run_error(["generate", trained, "--conditions-file", workdir / "unknown.csv"], capsys)


def test_evaluate_writes_metrics_per_condition(generated, workdir, capsys):
    out = workdir / "metrics.csv"
    with pytest.warns(UserWarning, match="Skipped conditions"):
        stdout = run_ok(["evaluate", workdir / "real.h5ad", generated, "--condition-key", "cell_type", "--out", out],
                        capsys)
    table = pd.read_csv(out, index_col=0)
    assert list(table.index) == [OTHER_CELL_TYPE, CELL_TYPE, "mean"] and table.loc[CELL_TYPE, "n_generated"] == 12
    assert 0 <= table.loc["mean", "cell_type_f1_generated"] <= 1
    assert f"metrics written to {out}" in stdout


# --- Errors: one line, exit code 2 ---


def test_evaluate_one_generated_cell_type_is_an_error_line(workdir, generated, capsys):
    assert "needs at least two" in run_error(
        ["evaluate", workdir / "real.h5ad", workdir / "generated_0.h5ad", "--condition-key", "cell_type",
         "--out", workdir / "one.csv"], capsys)


@pytest.mark.parametrize(("case", "build", "covariates", "error", "message"), MALFORMED, ids=MALFORMED_IDS)
def test_convert_rejects_malformed_data(pbmc_counts, tmp_path, capsys, case, build, covariates, error, message):
    build(pbmc_counts[:60].copy()).write_h5ad(tmp_path / "bad.h5ad")
    line = run_error(["convert", tmp_path / "bad.h5ad", tmp_path / "corpus",
                      *[arg for name in covariates for arg in ("--covariate", name)]], capsys)
    assert re.search(message, line), line
    assert not (tmp_path / "corpus").exists()


def test_convert_vocabulary_overlap_minimum_is_configurable(workdir, tmp_path, capsys):
    vocab = GeneVocab(list(ad.read_h5ad(workdir / "real.h5ad").var_names[:100]) + [f"G{i}" for i in range(300)])
    vocab_file = vocab.save(tmp_path / "gene_vocab.json")
    args = ["convert", workdir / "real.h5ad", tmp_path / "corpus", "--vocab", vocab_file]
    with pytest.warns(UserWarning, match="665 of 765 genes are not in the 400-gene vocabulary"):
        line = run_error([*args, "--min-vocab-overlap", "0.3"], capsys)
    assert "Only 25.0% of the vocabulary genes are measured in the data (minimum 30.0%)" in line
    with pytest.warns(UserWarning):
        run_ok([*args, "--min-vocab-overlap", "0.2"], capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["convert", "missing.h5ad", "out"], r"No \.h5ad file at missing\.h5ad"),
        (["convert", "x.h5ad", "out", "--vocab", "nowhere"], r"No gene vocabulary at nowhere"),
        (["frobnicate"], r"argument command: invalid choice: 'frobnicate' .*\(see `scldm --help`\)"),
        (["generate", "pipe", "--num-cells", "ten"], r"argument --num-cells: invalid int value: 'ten'"),
        (["generate", "pipe", "--guidance-scale", "strong"], r"argument --guidance-scale: invalid float value"),
        (["generate", "pipe", "--num-cells", "0"], r"num_cells=0 must be a positive integer"),
        (["generate", "pipe", "--guidance-scale", "nan"], r"guidance_scale values must be finite numbers"),
        (["generate", "./nowhere/pipe"], r"No model folder at nowhere/pipe"),
        (["evaluate", "real.h5ad", "gen.h5ad", "--condition-key", "cell_type"], r"No real \.h5ad file at real\.h5ad"),
        (["evaluate", "real.h5ad", "gen.h5ad"], r"the following arguments are required: --condition-key"),
        (["train", "vae", "--config", str(TINY), "--batch_sise", "4"], r"unknown option"),
        (["train", "vae", "--config", str(TINY), "--data", "nowhere"], r"data='nowhere' is neither a corpus folder"),
    ],
)
def test_bad_command_lines(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert re.search(message, run_error(argv, capsys))


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ("cell_type=Alien",
         r"Unknown label\(s\) \['Alien'\] for covariate 'cell_type' .*known labels: 'CD14\+ Monocyte'"),
        ("donor=d1", r"unknown \['donor'\], missing \[\]; the model's covariates are \['cell_type'\]"),
        ("cell_type", r"--condition 'cell_type' is not KEY=LABEL"),
    ],
)
def test_generate_rejects_unknown_conditions(trained, tmp_path, capsys, condition, message):
    line = run_error(["generate", trained, "--condition", condition, "--num-cells", 2, "--out", tmp_path / "x.h5ad"],
                     capsys)
    assert re.search(message, line), line
    assert not (tmp_path / "x.h5ad").exists()


def test_generate_reports_broken_pipeline_folders(trained, tmp_path, capsys):
    broken = tmp_path / "truncated"
    shutil.copytree(trained / "transformer", broken / "transformer")
    for name in ("vae", "scheduler", "conditioner", "model_index.json"):
        (shutil.copytree if (trained / name).is_dir() else shutil.copy)(trained / name, broken / name)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = run_error(["generate", broken], capsys)
    assert f"Weights file {weights} is truncated or corrupted" in line and "re-download the model" in line
    shutil.rmtree(broken / "transformer")
    assert "has no 'transformer' component" in run_error(["generate", broken], capsys)


def test_train_dit_reports_a_truncated_vae(trained, corpus, workdir, tmp_path, capsys):
    vae = tmp_path / "vae"
    shutil.copytree(workdir / "vae", vae, ignore=shutil.ignore_patterns("checkpoints", "corpus"))
    (vae / "model.safetensors").write_bytes((vae / "model.safetensors").read_bytes()[:1000])
    line = run_error(["train", "dit", "--config", TINY, "--data", corpus, "--vae_name_or_path", vae,
                      "--output_dir", tmp_path / "pipeline", *TWO_STEPS], capsys)
    assert "model.safetensors is truncated or corrupted" in line


def test_debug_shows_the_traceback():
    with pytest.raises(ConfigurationError, match="num_cells=0"):
        main(["--debug", "generate", "pipe", "--num-cells", "0"])


def test_console_script_prints_one_line_and_exits_2():
    result = subprocess.run([str(SCLDM), "frobnicate"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: argument command: invalid choice: 'frobnicate'")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "vae", "--help"], ["--model.hidden_size", "Width of gene tokens", "(default: 64)",
                                       "--learning_rate", "Peak AdamW learning rate. (default: 0.001)"]),
        (["train", "dit", "-h"], ["--model.num_layers", "Number of DiT blocks. (default: 6)", "--condition_dropout"]),
        (["train", "finetune", "--config", TINY, "--help"], ["--pipeline_name_or_path", "(default: 0.0005)"]),
        (["generate", "--help"], ["--guidance-scale", "classifier-free guidance", "(default: 1.0)", "(default: 25)"]),
        (["evaluate", "-h"], ["--condition-key", "obs column the cells are grouped by", "(default: metrics.csv)"]),
    ],
)
def test_help_lists_every_option_with_its_default(capsys, argv, expected):
    """--help exits 0 and shows what each option means and its default (after --config: the recipe's values)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    help_text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0
    assert all(" ".join(text.split()) in help_text for text in expected), help_text


def test_every_option_has_a_help_text():
    subcommands = next(action for action in build_parser()._actions if action.dest == "command").choices
    parsers = [*subcommands.values(), *(RecipeParser(config_class, stage) for stage, (config_class, _) in STAGES.items())]
    undocumented = [(parser.prog, action.dest) for parser in parsers for action in parser._actions if not action.help]
    assert not undocumented
