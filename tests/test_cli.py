"""The `scldm` command line: every command end to end on 120 real PBMC cells, and every error as one line.

The happy path is one chain (convert -> train vae -> train dit -> generate -> evaluate) built once per module with
`training/configs/tiny.yaml` cut to 2 steps; each command has its own test of what it wrote.
"""

import json
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
import scipy.sparse as sp

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


@pytest.fixture(scope="module")
def reference(workdir, pbmc_counts) -> Path:
    """The training cells of the evaluation protocol: PBMC cells 120-359, disjoint from `real.h5ad`."""
    pbmc_counts[NUM_CELLS:3 * NUM_CELLS].copy().write_h5ad(workdir / "reference.h5ad")
    return workdir / "reference.h5ad"


def test_evaluate_writes_metrics_per_condition(generated, workdir, reference, capsys):
    out = workdir / "metrics.csv"
    stdout = run_ok(["evaluate", workdir / "real.h5ad", generated, "--condition-key", "cell_type",
                     "--reference", reference, "--out", out], capsys)
    table = pd.read_csv(out, index_col=0)
    # 44 Dendritic and 22 Monocyte real cells split in half for the floor; 12 generated of each: equal counts
    assert list(table.index) == [OTHER_CELL_TYPE, CELL_TYPE, "other (7 labels)", "mean"]
    assert table.loc[CELL_TYPE, "n_generated"] == table.loc[CELL_TYPE, "n_real"] == 12
    assert table.loc[OTHER_CELL_TYPE, "n_generated"] == 11
    assert list(table.columns[2:4]) == ["mmd_rbf", "mmd_rbf_real_floor"]
    assert 0 <= table.loc["mean", "cell_type_f1_generated"] <= 1
    assert "note: other (7 labels): labels with fewer than 10 comparable cells, pooled: CD19+ B (" in stdout
    assert "generated 24 -> 23" in stdout and f"metrics written to {out}" in stdout


@pytest.fixture(scope="module")
def pbmc_thirds(tmp_path_factory, pbmc_counts) -> dict[str, Path]:
    """PBMC68k in three disjoint random thirds (reference, real, other real sample) plus the other third with each
    gene's counts permuted across cells (per-gene marginals kept, gene-gene structure destroyed)."""
    root = tmp_path_factory.mktemp("thirds")
    order = np.random.default_rng(0).permutation(pbmc_counts.n_obs)
    paths = {}
    for name, part in zip(("reference", "real", "other"), np.array_split(order, 3)):
        paths[name] = root / f"{name}.h5ad"
        pbmc_counts[part].copy().write_h5ad(paths[name])
    shuffled = ad.read_h5ad(paths["other"])
    counts = shuffled.X.toarray()
    rng = np.random.default_rng(0)
    shuffled.X = sp.csr_matrix(np.stack([rng.permutation(column) for column in counts.T], axis=1))
    paths["shuffled"] = root / "shuffled.h5ad"
    shuffled.write_h5ad(paths["shuffled"])
    return paths


def test_evaluate_floor_is_null_and_a_shuffled_sample_scores_worse(pbmc_thirds, tmp_path, capsys):
    tables = {}
    for name in ("other", "shuffled"):
        out = tmp_path / f"{name}.csv"
        stdout = run_ok(["evaluate", pbmc_thirds["real"], pbmc_thirds[name], "--condition-key", "cell_type",
                         "--reference", pbmc_thirds["reference"], "--min-cells", 30, "--out", out], capsys)
        tables[name] = pd.read_csv(out, index_col=0)
    real, shuffled = tables["other"].loc["mean"], tables["shuffled"].loc["mean"]
    assert "note: other (9 labels): labels with fewer than 30 comparable cells, pooled: CD14+ Monocyte (" in stdout
    assert list(tables["other"].index) == ["Dendritic", "other (9 labels)", "mean"]
    for table in tables.values():  # the floor: the real cells split in half, under the reference's PCA
        floor = table.loc["mean"]
        assert abs(floor["mmd_rbf_real_floor"]) < 0.03
        assert 0.4 < floor["nn_accuracy_real_floor"] < 0.6 and 0.35 < floor["classifier_auroc_real_floor"] < 0.65
    assert abs(real["mmd_rbf"]) < 0.03 and real["classifier_auroc"] < 0.65  # a second real sample scores as the floor
    assert shuffled["mmd_rbf"] > shuffled["mmd_rbf_real_floor"] + 0.3
    assert shuffled["nn_accuracy"] > 0.9 and shuffled["classifier_auroc"] > 0.9
    assert shuffled["gene_correlation_all_cells"] < 0.5 < shuffled["gene_correlation_all_cells_real_floor"]
    assert shuffled["cell_type_f1_generated"] < shuffled["cell_type_f1_generated_real_floor"]


def test_evaluate_reads_counts_from_a_layer(pbmc_thirds, tmp_path, capsys):
    layered = {}
    for name in ("real", "reference"):  # the usual object: log-normalised X, counts in a layer
        adata = ad.read_h5ad(pbmc_thirds[name])
        adata.layers["counts"] = adata.X.copy()
        adata.X = sp.csr_matrix(np.log1p(adata.X.toarray() / adata.X.sum(axis=1).A * 1e4))
        layered[name] = tmp_path / f"{name}.h5ad"
        adata.write_h5ad(layered[name])
    argv = ["evaluate", layered["real"], pbmc_thirds["other"], "--condition-key", "cell_type", "--reference",
            layered["reference"], "--min-cells", 30, "--out", tmp_path / "metrics.csv"]
    assert "non-integer" in run_error(argv, capsys)
    run_ok([*argv, "--layer", "counts"], capsys)
    assert abs(pd.read_csv(tmp_path / "metrics.csv", index_col=0).loc["mean", "mmd_rbf"]) < 0.03


def test_evaluate_without_reference_is_refused_or_flagged(pbmc_thirds, tmp_path, capsys):
    argv = ["evaluate", pbmc_thirds["real"], pbmc_thirds["other"], "--condition-key", "cell_type", "--out",
            tmp_path / "biased.csv"]
    assert "needs --reference TRAIN.h5ad" in run_error(argv, capsys)
    stdout = run_ok([*argv, "--allow-biased-reference", "--min-cells", 40], capsys)
    assert stdout.startswith("note: BIASED REFERENCE: the PCA is fitted on the real cells compared")


# --- Errors: one line, exit code 2 ---


def test_evaluate_one_generated_cell_type_is_an_error_line(workdir, generated, reference, capsys):
    assert "needs at least two" in run_error(
        ["evaluate", workdir / "real.h5ad", workdir / "generated_0.h5ad", "--condition-key", "cell_type",
         "--reference", reference, "--out", workdir / "one.csv"], capsys)


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
        (["convert", "x.h5ad", "a" * 300], r"\[Errno 36\] File name too long: 'a+'; check the paths given and their perm"),
        (["frobnicate"], r"argument command: invalid choice: 'frobnicate' .*\(see `scldm --help`\)"),
        (["generate", "pipe", "--num-cells", "ten"], r"argument --num-cells: invalid int value: 'ten'"),
        (["generate", "pipe", "--guidance-scale", "strong"], r"argument --guidance-scale: invalid float value"),
        (["generate", "pipe", "--num-cells", "0"], r"num_cells=0 must be a positive integer"),
        (["generate", "pipe", "--guidance-scale", "nan"], r"guidance_scale values must be numbers from 0 to 100"),
        (["generate", "./nowhere/pipe"], r"No model folder at nowhere/pipe"),
        (["evaluate", "real.h5ad", "gen.h5ad", "--condition-key", "cell_type", "--reference", "train.h5ad"],
         r"No real \.h5ad file at real\.h5ad"),
        (["evaluate", "real.h5ad", "gen.h5ad"], r"the following arguments are required: --condition-key"),
        (["train", "vae", "--config", str(TINY), "--batch_sise", "4"], r"unknown option"),
        (["train", "vae", "--config", str(TINY), "--data", "nowhere"], r"data='nowhere' is neither a corpus folder"),
    ],
)
def test_bad_command_lines(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert re.search(message, run_error(argv, capsys))


def test_bad_files_are_one_error_line(workdir, tmp_path, monkeypatch, capsys):
    """Malformed recipes, conditions files and h5ad files, and outputs that cannot be written (issue 18, WEAK)."""
    monkeypatch.chdir(tmp_path)
    Path("syntax.yaml").write_text("vae: [1, 2\nlearning_rate: : 3\n")
    Path("section.yaml").write_text("vae: [1, 2]\n")
    Path("empty.h5ad").write_bytes(b"")
    Path("binary.csv").write_bytes(b"\xff\xfe\x00garbage\n")
    real = workdir / "real.h5ad"
    cases = [
        (["train", "vae", "--config", "syntax.yaml"], r"config file syntax\.yaml is not valid YAML: while parsing"),
        (["train", "vae", "--config", "section.yaml"],
         r"section 'vae' of config file section\.yaml must be a mapping of option: value, not list \[1, 2\]"),
        (["train", "vae", "--config", TINY, "--data", "empty.h5ad", "--output_dir", "run"],
         r"empty\.h5ad cannot be read as \.h5ad \(.*\); it is truncated, empty or not an AnnData"),
        (["convert-original", "empty.h5ad", "--config", "syntax.yaml", "--output", "out"],
         r"Config syntax\.yaml is not valid YAML \(while parsing"),
        (["convert", "empty.h5ad", "corpus"], r"empty\.h5ad cannot be read as \.h5ad"),
        (["convert", real, "empty.h5ad/corpus"], r"cannot create the folder of empty\.h5ad/corpus .*choose another output_dir"),
        (["convert", real, "corpus", "--min-vocab-overlap", "nan"], r"min_vocab_overlap=nan must be a fraction"),
        (["generate", "pipe", "--conditions-file", "empty.h5ad"],
         r"empty\.h5ad cannot be read as CSV \(EmptyDataError: .*\): write a UTF-8 CSV"),
        (["generate", "pipe", "--conditions-file", "binary.csv"], r"binary\.csv cannot be read as CSV \(UnicodeDecodeError"),
    ]
    for argv, message in cases:
        line = run_error(argv, capsys)
        assert re.search(message, line), (argv, line)
    assert not Path("corpus").exists() and not Path("run").exists()  # a failed set-up removes the folder it made


def test_generate_refuses_a_model_index_of_other_classes(trained, tmp_path, capsys):
    folder = tmp_path / "pipeline"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoints"))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "DDPMScheduler"]}))
    line = run_error(["generate", folder, "--out", tmp_path / "x.h5ad"], capsys)
    assert "names the 'scheduler' component ['diffusers', 'DDPMScheduler']" in line
    assert "'FlowMatchEulerDiscreteScheduler'" in line and not (tmp_path / "x.h5ad").exists()


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


# --- Outputs checked before work, --overwrite, streaming output ---


def test_generate_output_is_checked_before_work_and_overwritten_only_when_asked(trained, tmp_path, capsys):
    out = tmp_path / "cells.h5ad"
    out.write_text("keep me")
    assert "already exists: choose another --out, or pass --overwrite" in run_error(
        generate_args(trained, out), capsys)
    assert out.read_text() == "keep me"
    run_ok([*generate_args(trained, out), "--overwrite"], capsys)
    assert ad.read_h5ad(out).n_obs == 12
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "cannot create the folder of" in run_error(generate_args(trained, blocker / "sub" / "x.h5ad"), capsys)


def test_generate_streams_into_a_corpus_folder(trained, tmp_path, capsys):
    out = tmp_path / "generated_corpus"
    stdout = run_ok([*generate_args(trained, out), "--batch-size", 5], capsys)
    dataset, info = load_corpus(out)
    assert "12 cells written" in stdout and len(dataset) == info.num_cells == 12
    assert set(dataset.features["cell_type"].int2str(dataset["cell_type"])) == {CELL_TYPE}


def test_repeated_condition_keys_are_refused(trained, tmp_path, capsys):
    line = run_error(["generate", trained, "--condition", f"cell_type={CELL_TYPE}", "--condition",
                      f"cell_type={OTHER_CELL_TYPE}", "--out", tmp_path / "x.h5ad"], capsys)
    assert "--condition cell_type=... is given twice" in line


def test_evaluate_refuses_duplicate_gene_names_and_unreadable_files(workdir, generated, tmp_path, capsys):
    real = ad.read_h5ad(workdir / "real.h5ad")
    real.var_names = ["CD3D"] * 2 + list(real.var_names[2:])
    real.write_h5ad(tmp_path / "duplicated.h5ad")
    args = ["--condition-key", "cell_type", "--reference", workdir / "real.h5ad", "--out", tmp_path / "m.csv"]
    line = run_error(["evaluate", tmp_path / "duplicated.h5ad", generated, *args], capsys)
    assert "In the real file" in line and "var_names_make_unique()" in line
    (tmp_path / "empty.h5ad").write_bytes(b"")
    line = run_error(["evaluate", tmp_path / "empty.h5ad", generated, *args], capsys)
    assert "cannot be read as .h5ad" in line


def test_convert_overwrite_flag(workdir, tmp_path, capsys):
    out = tmp_path / "corpus"
    run_ok(["convert", workdir / "real.h5ad", out], capsys)
    assert "--overwrite" in run_error(["convert", workdir / "real.h5ad", out], capsys)
    run_ok(["convert", workdir / "real.h5ad", out, "--overwrite"], capsys)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "vae", "--help"], ["--model.hidden_size", "Width of gene tokens", "(default: 64)",
                                       "--learning_rate", "Peak AdamW learning rate. (default: 0.001)"]),
        (["train", "dit", "-h"], ["--model.num_layers", "Number of DiT blocks. (default: 6)", "--condition_dropout"]),
        (["train", "finetune", "--config", TINY, "--help"], ["--pipeline_name_or_path", "(default: 0.0005)"]),
        (["generate", "--help"], ["--guidance-scale", "classifier-free guidance", "(default: 1.0)", "(default: 25)"]),
        (["evaluate", "-h"], ["--condition-key", "obs column of the labels compared one by one", "(default: metrics.csv)"]),
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
