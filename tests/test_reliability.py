"""Every way a user can hand scldm-hf bad input ends in an `SCLDMError` that names the problem and the fix.

Covers the data path (AnnData / .h5ad -> corpus, collator cap), generation inputs (SCLDMPipeline), checked model
loading (scldm_hf.loading: truncated, mismatched or incomplete folders) and the safety audit (no pickled weights).
The same malformed files are fed to `scldm convert` in tests/test_cli.py.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from scldm_hf.data import CellCollator, GeneVocab, anndata_to_corpus, anndata_to_dataset, encode_dataset, load_corpus
from scldm_hf.errors import CheckpointError, ConditionError, ConfigurationError, InputDataError, VocabularyError
from scldm_hf.loading import check_safetensors_file, load_gene_vocab, load_pipeline, load_vae
from scldm_hf.models import SCVAEConfig, SCVAEModel
from scldm_hf.models.conditioning import CellConditioner
from scldm_hf.models.transformer_latent_dit import LatentDiTTransformer
from scldm_hf.pipelines import SCLDMPipeline
from scldm_hf.validation import check_classifier_labels, check_count_range, device_memory_bytes

NUM_CELLS = 60
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle"}


def small_counts(pbmc_counts) -> ad.AnnData:
    """The first 60 PBMC cells (765 genes, CSR float32 integer counts, obs `cell_type`)."""
    return pbmc_counts[:NUM_CELLS].copy()


def with_data(adata: ad.AnnData, transform) -> ad.AnnData:
    """Copy of `adata` whose stored nonzero values are replaced by `transform(values)`."""
    adata = adata.copy()
    adata.X.data = transform(adata.X.data)
    return adata


def zero_cell(adata: ad.AnnData, cell: int) -> ad.AnnData:
    adata = adata.copy()
    matrix = adata.X.tolil()
    matrix[cell] = 0
    adata.X = sp.csr_matrix(matrix)
    return adata


def renamed_genes(adata: ad.AnnData, names) -> ad.AnnData:
    adata = adata.copy()
    adata.var_names = names
    return adata


def relabelled(adata: ad.AnnData, column: str, labels) -> ad.AnnData:
    adata = adata.copy()
    adata.obs[column] = labels
    return adata


# (case id, AnnData builder, covariates, error class, message). Shared with tests/test_cli.py through `MALFORMED`.
MALFORMED = [
    ("log_normalised", lambda a: with_data(a, np.log1p), [], InputDataError,
     r"X holds non-integer values .* in cell '.*'\): this looks log-normalised or scaled: pass raw integer counts"),
    ("scaled", lambda a: with_data(a, lambda x: x * 0.37), [], InputDataError, r"non-integer values"),
    ("negative", lambda a: with_data(a, lambda x: x - 3), [], InputDataError,
     r"X holds negative values \(e\.g\. -\d+ in cell '.*'\): counts must be >= 0, this looks scaled or centred"),
    ("nan", lambda a: with_data(a, lambda x: np.where(np.arange(x.size) == 7, np.nan, x)), [], InputDataError,
     r"X holds NaN or infinite values \(first in cell '.*'\): counts must be finite"),
    ("inf", lambda a: with_data(a, lambda x: np.where(np.arange(x.size) == 7, np.inf, x)), [], InputDataError,
     r"NaN or infinite"),
    ("all_zero_cell", lambda a: zero_cell(a, 3), [], InputDataError,
     r"1 cells have no counts over the 765 measured vocabulary genes \(first: '.*'\).*filter_cells"),
    ("duplicate_genes", lambda a: renamed_genes(a, ["CD3D"] * 3 + list(a.var_names[3:])), [], InputDataError,
     r"1 gene names occur more than once in var_names \(e\.g\. 'CD3D'\).*var_names_make_unique"),
    ("missing_covariate", lambda a: a, ["donor"], ConditionError,
     r"Covariate column\(s\) 'donor' not found in adata\.obs; available columns: 'bulk_labels', 'cell_type'"),
    ("nan_labels", lambda a: relabelled(a, "cell_type", [None] * 2 + list(a.obs["cell_type"].astype(str)[2:])),
     ["cell_type"], ConditionError, r"Covariate column 'cell_type' has 2 missing \(NaN\) labels"),
    ("empty", lambda a: a[:0].copy(), [], InputDataError, r"The AnnData is empty \(0 cells x 765 genes\)"),
    ("bool_sparse", lambda a: ad.AnnData(a.X.astype(bool), obs=a.obs, var=a.var), [], InputDataError,
     r"X has dtype bool, which cannot hold counts"),
]
MALFORMED_IDS = [case[0] for case in MALFORMED]


@pytest.fixture(scope="module")
def counts(pbmc_counts) -> ad.AnnData:
    return small_counts(pbmc_counts)


# --- Data: in memory and read backed from .h5ad ---


@pytest.mark.parametrize(("case", "build", "covariates", "error", "message"), MALFORMED, ids=MALFORMED_IDS)
def test_malformed_anndata_raises_in_memory_and_backed(counts, tmp_path, case, build, covariates, error, message):
    adata = build(counts)
    with pytest.raises(error, match=message):
        anndata_to_dataset(adata, covariates=covariates)
    adata.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(error, match=message):
        anndata_to_corpus(tmp_path / "bad.h5ad", tmp_path / "corpus", covariates=covariates)
    assert not (tmp_path / "corpus").exists() and list(tmp_path.iterdir()) == [tmp_path / "bad.h5ad"]


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "cannot be read as .h5ad"), (b"not hdf5 at all", "cannot be read as .h5ad"), (None, "has no obs, var, X")],
    ids=["empty", "text", "hdf5_without_anndata"],
)
def test_unreadable_h5ad_files_are_named(counts, tmp_path, content, message):
    path = tmp_path / "cells.h5ad"
    if content is None:
        with h5py.File(path, "w") as file:
            file["something"] = np.zeros(3)
    else:
        path.write_bytes(content)
    with pytest.raises(InputDataError, match=rf"{re.escape(str(path))} {message}.*write it again with adata\.write_h5ad"):
        anndata_to_corpus(path, tmp_path / "corpus")
    assert not (tmp_path / "corpus").exists()


def test_truncated_h5ad_is_named(counts, tmp_path):
    counts.write_h5ad(tmp_path / "cells.h5ad")
    truncate(tmp_path / "cells.h5ad", keep=0.3)
    with pytest.raises(InputDataError, match=r"cells\.h5ad cannot be read as \.h5ad \(.*truncated file"):
        anndata_to_corpus(tmp_path / "cells.h5ad", tmp_path / "corpus")


@pytest.mark.parametrize("minimum", [-0.1, 1.5, float("nan")])
def test_vocabulary_overlap_minimum_must_be_a_fraction(counts, minimum):
    with pytest.raises(ConfigurationError, match=rf"min_vocab_overlap={minimum} must be a fraction between 0 and 1"):
        anndata_to_dataset(counts, vocab=GeneVocab(list(counts.var_names)), min_vocab_overlap=minimum)


def test_genes_outside_the_vocabulary_report_the_overlap(counts):
    vocab = GeneVocab(list(counts.var_names[:100]) + [f"ENSG{i:011d}" for i in range(300)])
    with pytest.warns(UserWarning, match=r"665 of 765 genes are not in the 400-gene vocabulary"):
        dataset, info = anndata_to_dataset(counts, vocab=vocab, min_vocab_overlap=0.2)
    assert len(info.measured_gene_ids) == 100 and len(dataset) <= NUM_CELLS
    with pytest.warns(UserWarning), pytest.raises(
        VocabularyError, match=r"Only 25\.0% of the vocabulary genes are measured in the data \(minimum 50\.0%\)"
    ):
        anndata_to_dataset(counts, vocab=vocab, min_vocab_overlap=0.5)


def test_model_vocabulary_mismatch_is_caught_before_encoding(tiny_pipeline, counts):
    ensembl = renamed_genes(counts, [f"ENSG{i:011d}" for i in range(counts.n_vars)])
    with pytest.warns(UserWarning), pytest.raises(VocabularyError, match=r"Only 0\.0% of the vocabulary genes"):
        encode_dataset(tiny_pipeline.vae, ensembl, show_progress=False)


def test_collator_caps_expressed_genes_by_subsampling_whole_cell_totals_kept(counts):
    dataset, info = anndata_to_dataset(counts)
    rows = [dataset[i] for i in range(4)]
    batch = CellCollator.from_corpus_info(info, max_genes=5, seed=1)(rows)
    full = CellCollator.from_corpus_info(info)(rows)
    assert batch["gene_ids"].shape == (4, 5) and batch["attention_mask"].all()
    assert all(set(kept.tolist()) <= set(row["gene_ids"]) for kept, row in zip(batch["gene_ids"], rows))
    torch.testing.assert_close(batch["library_size"], full["library_size"])
    torch.testing.assert_close(batch["panel_counts"], full["panel_counts"])
    with pytest.raises(ConfigurationError, match=r"max_genes must be a positive number of genes or None, got 0"):
        CellCollator.from_corpus_info(info, max_genes=0)


def test_check_count_range_names_the_cell():
    chunk = sp.csr_matrix(np.array([[1.0, 0.0], [0.0, 2.0**33]]))
    with pytest.raises(InputDataError, match=r"X holds counts above 2147483647 \(e\.g\. 8\.58993e\+09 in cell 'c1'\)"):
        check_count_range(chunk, ["c0", "c1"])
    check_count_range(sp.csr_matrix(np.array([[2**31 - 1]], dtype=np.int64)), ["c0"])


def test_check_classifier_labels_needs_two_classes():
    with pytest.raises(ConditionError, match=r"The generated cells have 1 label\(s\) in 'cell_type' \('B'\)"):
        check_classifier_labels(["B", "B"], "generated", "cell_type")
    check_classifier_labels(["B", "T"], "generated", "cell_type")


@pytest.mark.parametrize("dtype", ["float64", "int64", "uint32"])
def test_counts_beyond_int32_are_rejected(counts, dtype):
    adata = counts.copy()
    adata.X = adata.X.astype(dtype)
    adata.X[0, adata.X[0].indices[0]] = 2**31 + 5
    with pytest.raises(InputDataError, match=r"counts above 2147483647"):
        anndata_to_dataset(adata)


# --- Generation inputs ---


@pytest.fixture(scope="module")
def tiny_pipeline(pbmc_counts) -> SCLDMPipeline:
    """An untrained pipeline over the 765 PBMC genes with covariate `cell_type` (10 labels)."""
    torch.manual_seed(0)
    dataset, info = anndata_to_dataset(pbmc_counts[:200].copy(), covariates=["cell_type"])
    vae = SCVAEModel(SCVAEConfig(
        gene_names=info.genes, hidden_size=16, num_latent_tokens=4, latent_dim=8, encoder_layers=1, decoder_layers=1,
        encoder_cross_attention_heads=2, decoder_cross_attention_heads=2, num_attention_heads=2,
    ))
    conditioner = CellConditioner.from_dataset(dataset)
    transformer = LatentDiTTransformer(
        num_latent_tokens=4, latent_dim=8, hidden_size=16, num_layers=1, num_attention_heads=2,
        timestep_embedding_dim=16, covariate_num_labels=conditioner.num_labels,
    )
    pipe = SCLDMPipeline(vae, transformer, FlowMatchEulerDiscreteScheduler(), conditioner)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_cells": 0}, ConfigurationError, r"num_cells=0 must be a positive integer"),
        ({"num_cells": -3}, ConfigurationError, r"num_cells=-3 must be a positive integer"),
        ({"num_cells": 2.5}, ConfigurationError, r"num_cells=2\.5 must be a positive integer"),
        ({"num_cells": True}, ConfigurationError, r"num_cells=True must be a positive integer"),
        ({"num_cells": 2, "guidance_scale": "2"}, ConfigurationError, r"guidance_scale values must be numbers from 0 to 100"),
        ({"num_cells": 2, "guidance_scale": float("nan")}, ConfigurationError, r"must be numbers from 0 to 100"),
        ({"num_cells": 2, "guidance_scale": -1.0}, ConfigurationError, r"got \{'guidance_scale': -1\.0\}"),
        ({"num_cells": 2, "guidance_scale": 1e30}, ConfigurationError, r"must be numbers from 0 to 100"),
        ({"num_cells": 2, "latents": torch.zeros(3, 4, 8)}, ConfigurationError,
         r"latents have shape \(3, 4, 8\) but 2 cells need initial noise of shape \[2, 4, 8\]"),
        ({"conditions": {"cell_type": ["CD19+ B"]}, "num_cells": 2, "guidance_scale": {"donor": 2.0}},
         ConfigurationError, r"Per-covariate guidance_scale has keys \['donor'\] but the cells are conditioned on "
                             r"\['cell_type'\]"),
        ({"conditions": {"cell_type": ["Alien"]}, "num_cells": 2}, ConditionError,
         r"Unknown label\(s\) \['Alien'\] for covariate 'cell_type' \(1 cells, first at row 0\); known labels: "
         r"'CD14\+ Monocyte', .*'Dendritic'"),
        ({"conditions": {"donor": ["d1"]}, "num_cells": 2}, ConditionError,
         r"unknown \['donor'\], missing \[\]; the model's covariates are \['cell_type'\]"),
        ({"conditions": {"cell_type": ["CD19+ B", None]}}, ConditionError,
         r"Condition column 'cell_type' has 1 missing labels \(first at row 1\)"),
        ({"conditions": ["CD19+ B"], "num_cells": 1}, ConditionError, r"conditions must be a dict"),
        ({"num_cells": 2, "num_inference_steps": 0}, ConfigurationError, r"num_inference_steps=0 must be a positive"),
    ],
)
def test_bad_generation_inputs_raise_before_sampling(tiny_pipeline, kwargs, error, message):
    with pytest.raises(error, match=message):
        tiny_pipeline(**kwargs)


def test_generation_too_large_for_memory_names_the_streaming_path(tiny_pipeline):
    """`__call__` draws every cell's noise at once: more cells than memory holds are refused before allocating."""
    bytes_per_cell = 4 * 8 * torch.float32.itemsize  # [T=4, D=8] float32 noise
    num_cells = device_memory_bytes(torch.device("cpu")) // bytes_per_cell + 1
    with pytest.raises(ConfigurationError, match=rf"initial noise of {num_cells} cells needs .* GiB at once.*generate_to_file"):
        tiny_pipeline(num_cells=num_cells)
    assert next(tiny_pipeline.generate_batches(num_cells=num_cells, num_inference_steps=1, batch_size=2)).counts.shape == (2, 765)


def test_valid_generation_gives_integer_counts_over_the_vocabulary(tiny_pipeline):
    cells = tiny_pipeline(
        {"cell_type": ["CD19+ B"]}, num_cells=3, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).cells
    assert cells.shape == (3, 765) and cells.X.dtype == np.int32 and (cells.X.data >= 0).all()
    assert list(cells.obs["cell_type"]) == ["CD19+ B"] * 3


# --- Loading saved models (scldm_hf.loading) and the safety audit ---


@pytest.fixture(scope="module")
def saved(tiny_pipeline, tmp_path_factory) -> Path:
    """`saved/pipeline` (pipe.save_pretrained) and `saved/vae` (vae.save_pretrained)."""
    root = tmp_path_factory.mktemp("saved")
    tiny_pipeline.save_pretrained(root / "pipeline")
    tiny_pipeline.vae.save_pretrained(root / "vae")
    return root


def broken_copy(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def edit_config(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_intact_folders_load(saved, tiny_pipeline):
    vae = load_vae(saved / "vae")
    pipe = load_pipeline(saved / "pipeline")
    assert vae.gene_vocab == tiny_pipeline.vae.gene_vocab
    torch.testing.assert_close(pipe.transformer.proj_in.weight, tiny_pipeline.transformer.proj_in.weight)
    assert load_gene_vocab(saved / "pipeline") == load_gene_vocab(saved / "vae") == vae.gene_vocab


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0])
def test_truncated_vae_weights_name_the_file_and_the_fix(saved, tmp_path, keep):
    folder = broken_copy(saved / "vae", tmp_path)
    truncate(folder / "model.safetensors", keep)
    message = rf"Weights file {folder / 'model.safetensors'} is truncated or corrupted \(.*\): re-download the model"
    with pytest.raises(CheckpointError, match=message):
        load_vae(folder)


def test_garbage_weights_file_is_a_checkpoint_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupted"):
        check_safetensors_file(tmp_path / "model.safetensors")


@pytest.mark.parametrize(
    ("component", "weights"),
    [("transformer", "diffusion_pytorch_model.safetensors"), ("vae", "model.safetensors"),
     ("conditioner", "diffusion_pytorch_model.safetensors")],
)
def test_truncated_pipeline_component_is_named(saved, tmp_path, component, weights):
    folder = broken_copy(saved / "pipeline", tmp_path)
    truncate(folder / component / weights)
    with pytest.raises(CheckpointError, match=rf"{component}/{weights} is truncated or corrupted"):
        load_pipeline(folder)


def test_config_that_does_not_fit_the_weights(saved, tmp_path):
    vae_folder = broken_copy(saved / "vae", tmp_path)
    edit_config(vae_folder / "config.json", hidden_size=32, num_attention_heads=4)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors do not match .*config\.json \(\d+ tensors of another shape \(e\.g\. "
              r".*'gene_embedding\.weight' \[766, 16\] vs \[766, 32\]",
    ):
        load_vae(vae_folder)
    pipeline_folder = broken_copy(saved / "pipeline", tmp_path)
    edit_config(pipeline_folder / "transformer" / "config.json", num_layers=2)
    with pytest.raises(CheckpointError, match=r"transformer/config\.json \(\d+ tensors missing from the weights"):
        load_pipeline(pipeline_folder)


def test_vocabulary_edited_in_the_config_is_caught(saved, tmp_path):
    folder = broken_copy(saved / "vae", tmp_path)
    genes = json.loads((folder / "config.json").read_text())["gene_names"]
    edit_config(folder / "config.json", gene_names=genes[:-5])
    with pytest.raises(CheckpointError, match=r"'gene_embedding\.weight' \[766, 16\] vs \[761, 16\]"):
        load_vae(folder)


@pytest.mark.parametrize("component", ["transformer", "vae", "scheduler", "conditioner"])
def test_missing_pipeline_component_is_named(saved, tmp_path, component):
    folder = broken_copy(saved / "pipeline", tmp_path)
    shutil.rmtree(folder / component)
    with pytest.raises(CheckpointError, match=rf"has no '{component}' component .*pipe\.save_pretrained\(folder\)"):
        load_pipeline(folder)


def test_missing_folders_and_files(saved, tmp_path):
    with pytest.raises(CheckpointError, match=r"No model folder at .*nowhere: pass the folder written by save_pre"):
        load_pipeline(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"lacks 'model_index\.json'"):
        load_pipeline(saved / "vae")
    folder = broken_copy(saved / "vae", tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"Weights file .*model\.safetensors is missing"):
        load_vae(folder)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]"], ids=["malformed", "empty", "list"])
@pytest.mark.parametrize("config", ["model_index.json", "vae/config.json", "transformer/config.json",
                                    "conditioner/config.json", "scheduler/scheduler_config.json"])
def test_unreadable_json_configs_are_named(saved, tmp_path, config, text):
    folder = broken_copy(saved / "pipeline", tmp_path)
    (folder / config).write_text(text)
    message = "holds a JSON list, not an object" if text.startswith("[") else r"is not a valid JSON file \(JSONDecodeError"
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(folder / config))} {message}.*re-save it"):
        load_pipeline(folder)


@pytest.mark.parametrize(
    ("component", "entry"),
    [("scheduler", ["diffusers", "DDPMScheduler"]), ("scheduler", ["diffusers", "StableDiffusionPipeline"]),
     ("scheduler", ["os", "system"]), ("scheduler", None), ("vae", ["transformers", "BertModel"]),
     ("transformer", "LatentDiTTransformer")],
)
def test_model_index_naming_other_classes_is_refused(saved, tmp_path, component, entry):
    folder = broken_copy(saved / "pipeline", tmp_path)
    edit_config(folder / "model_index.json", **{component: entry})
    with pytest.raises(CheckpointError, match=rf"names the '{component}' component {re.escape(repr(entry))}; an "
                                              rf"SCLDMPipeline {component} is \[library, class\] with class one of"):
        load_pipeline(folder)


def test_unreadable_gene_vocabularies_are_named(saved, tmp_path):
    (tmp_path / "gene_vocab.json").write_text("{truncated")
    with pytest.raises(CheckpointError, match=r"gene_vocab\.json is not a valid JSON file"):
        load_gene_vocab(tmp_path / "gene_vocab.json")
    (tmp_path / "other.json").write_text('{"names": ["CD3D"]}')
    with pytest.raises(CheckpointError, match=r"other\.json has no list of gene names under \"genes\""):
        load_gene_vocab(tmp_path / "other.json")
    folder = broken_copy(saved / "vae", tmp_path)
    (folder / "config.json").write_text("")
    with pytest.raises(CheckpointError, match=r"vae/config\.json is not a valid JSON file"):
        load_gene_vocab(folder)


def test_pickled_weights_are_refused(saved, tmp_path):
    folder = broken_copy(saved / "vae", tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"holds only pickled weights \(pytorch_model\.bin\), which can run code"):
        load_vae(folder)


def test_saved_folders_hold_no_pickles(saved):
    """Weights are safetensors; the VAE also saves its code (.py) for `AutoModel(trust_remote_code=True)`."""
    files = [path for path in saved.rglob("*") if path.is_file()]
    suffixes = {path.suffix for path in files}
    assert suffixes <= {".json", ".safetensors", ".md", ".py"}, suffixes
    assert not suffixes & PICKLE_SUFFIXES
    assert {path.relative_to(saved).as_posix() for path in files if path.suffix == ".safetensors"} == {
        "vae/model.safetensors", "pipeline/vae/model.safetensors",
        "pipeline/transformer/diffusion_pytorch_model.safetensors",
        "pipeline/conditioner/diffusion_pytorch_model.safetensors",
    }


def test_package_never_unpickles():
    """Safety audit of the source: no pickle (but the restricted plain-data unpickler of the released size factors,
    which refuses every global), no torch.load without weights_only=True, no unsafe serialization."""
    package = Path(__file__).resolve().parents[1] / "scldm_hf"
    restricted_unpickler = package / "conversion" / "safe_pickle.py"
    assert "def find_class" in restricted_unpickler.read_text()
    for path in package.rglob("*.py"):
        source = path.read_text()
        for line in source.splitlines():
            if path != restricted_unpickler:
                assert "import pickle" not in line and "pickle.load" not in line, f"{path}: {line}"
            assert "safe_serialization=False" not in line, f"{path}: {line}"
            assert "allow_pickle=True" not in line, f"{path}: {line}"
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line}"


# --- Corpus outputs: reserved names, concurrent conversions, stale staging folders ---


@pytest.mark.parametrize("name", ["counts", "gene_ids", "library_size", "cell_id", "latents"])
def test_covariate_with_a_reserved_column_name_is_refused(counts, tmp_path, name):
    adata = relabelled(counts, name, ["x"] * NUM_CELLS)
    with pytest.raises(ConditionError, match=rf"Covariate\(s\) '{name}' have the name of a column every cell row "
                                             r"already has \(reserved: cell_id, gene_ids, counts, library_size, latents\)"):
        anndata_to_corpus(adata, tmp_path / "corpus", covariates=[name])
    assert not (tmp_path / "corpus").exists()


@pytest.mark.parametrize("chunk_size", [0, -5, 2.5])
def test_non_positive_chunk_size_is_refused(counts, tmp_path, chunk_size):
    with pytest.raises(ConfigurationError, match=rf"chunk_size={chunk_size!r} must be a positive integer"):
        anndata_to_corpus(counts, tmp_path / "corpus", chunk_size=chunk_size)
    with pytest.raises(ConfigurationError, match="chunk_size"):
        anndata_to_dataset(counts, chunk_size=chunk_size)


def test_two_concurrent_conversions_into_one_folder(pbmc_counts, tmp_path):
    """Two `scldm convert` processes at once: exactly one succeeds, the other fails with one error line, and the
    folder holds one complete corpus."""
    pbmc_counts.write_h5ad(tmp_path / "in.h5ad")
    command = [str(Path(sys.executable).parent / "scldm"), "convert", str(tmp_path / "in.h5ad"), str(tmp_path / "out")]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    results = [(process.wait(timeout=120), process.stderr.read()) for process in processes]
    for process in processes:
        process.stdout.close()
        process.stderr.close()
    assert sorted(code for code, _ in results) == [0, 2], results
    failure = next(stderr for code, stderr in results if code == 2)
    assert re.search(r"^error: .*out (already exists|was written by another process)", failure, re.M), failure
    dataset, info = load_corpus(tmp_path / "out")
    assert len(dataset) == info.num_cells == pbmc_counts.n_obs
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.h5ad", "out"]


def test_existing_corpus_is_kept_without_overwrite(counts, tmp_path):
    anndata_to_corpus(counts[:10].copy(), tmp_path / "corpus")
    with pytest.raises(ConfigurationError, match=r"already exists.*--overwrite"):
        anndata_to_corpus(counts, tmp_path / "corpus")
    assert load_corpus(tmp_path / "corpus")[1].num_cells == 10


def test_staging_of_a_killed_conversion_is_removed_and_folders_are_readable(counts, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".corpus.{int(dead.stdout)}-0123abcd.tmp"
    stale.mkdir()
    (stale / "data-00000.arrow").write_bytes(b"\0" * 1000)
    anndata_to_corpus(counts, tmp_path / "corpus")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "corpus").stat().st_mode & 0o777 == 0o777 & ~umask


def test_counterfactual_of_a_partial_panel_keeps_the_measured_depth(tiny_pipeline, counts):
    """A panel of 300 of the model's 765 genes: over those genes the edited cells have their input's depth (before the
    fix, the measured total was spread over all 765 decoded genes and came out at about 300/765 of it)."""
    from scldm_hf.pipelines import SCLDMCounterfactualPipeline

    editor = SCLDMCounterfactualPipeline(**tiny_pipeline.components)
    editor.set_progress_bar_config(disable=True)
    panel = counts[:, :300].copy()
    panel = panel[np.asarray(panel.X.sum(axis=1)).ravel() > 0].copy()
    edited = editor(panel, {"cell_type": "CD19+ B"}, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0)).cells
    measured = edited[:, panel.var_names].X.sum(axis=1).A.ravel()
    input_depth = panel.X.sum(axis=1).A.ravel()
    assert abs(measured.sum() / input_depth.sum() - 1) < 0.05, (measured.sum(), input_depth.sum())
    assert edited.X.sum() > 1.5 * input_depth.sum()  # the other 465 genes are imputed on the same scale
