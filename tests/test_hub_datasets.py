"""Corpora pushed as Hub dataset repos (network replaced by `hub_cache.FakeHubApi`) open and train by repo id from a
Hugging Face cache laid out as a real download leaves it (``datasets--org--name/...``), offline."""

from pathlib import Path

import datasets
import numpy as np
import pytest
from huggingface_hub import ModelCard, get_cached_repo_tree
from hub_cache import FakeHubApi, use_offline_cache

from scldm_hf.cli import main
from scldm_hf.data import anndata_to_corpus, load_corpus
from scldm_hf.data import hub as data_hub
from scldm_hf.errors import InputDataError
from scldm_hf.models import SCVAEModel

REPO = "scldm-tests/cells"
TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"
NUM_CELLS = {"v0": 60, "main": 120}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def hub_corpus(tmp_path_factory, pbmc_counts):
    """Pushes a corpus of 60 PBMC cells (tagged `v0`), then one of 120 cells, to REPO with `push-corpus`."""
    root = tmp_path_factory.mktemp("hub_datasets")
    api = FakeHubApi(root / "cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_hub, "HfApi", lambda token=None: api)
        for name, num_cells in NUM_CELLS.items():
            pbmc_counts[:num_cells].copy().write_h5ad(root / f"{name}.h5ad")
            anndata_to_corpus(root / f"{name}.h5ad", root / name, covariates=["cell_type", "bulk_labels"])
            assert main(["push-corpus", str(root / name), REPO]) == 0
            if name == "v0":
                api.create_tag(REPO, "v0", repo_type="dataset")
    return {"root": root, "cache": root / "cache", "v0_commit": api.commits[0][1]}


@pytest.fixture
def offline_cache(hub_corpus, monkeypatch):
    use_offline_cache(monkeypatch, hub_corpus["cache"])
    return hub_corpus


def test_pushed_corpus_is_laid_out_as_a_dataset_download_without_local_paths(offline_cache):
    files = {file.path for file in get_cached_repo_tree(REPO, repo_type="dataset")}
    assert {"README.md", "corpus.json", "dataset_info.json", "data-00000-of-00001.arrow"} == files
    snapshots = offline_cache["cache"] / "datasets--scldm-tests--cells" / "snapshots"
    commit = (snapshots.parent / "refs" / "main").read_text()
    assert (snapshots / commit / "data-00000-of-00001.arrow").is_symlink()
    for path in files:
        assert str(offline_cache["root"]) not in (snapshots / commit / path).read_bytes().decode(errors="replace")
    # the dataset card lets `datasets` alone read the cells, ClassLabel covariates included
    cells = datasets.load_dataset(str(snapshots / commit), split="train")
    assert len(cells) == NUM_CELLS["main"] and "CD14+ Monocyte" in cells.features["cell_type"].names


@pytest.mark.parametrize("revision", [None, "v0", "v0_commit"])
def test_load_corpus_opens_a_repo_id_at_a_revision_with_its_genes_and_covariates(offline_cache, revision):
    revision = offline_cache.get(revision, revision)
    name = "main" if revision is None else "v0"
    dataset, info = load_corpus(REPO, revision=revision)
    local, local_info = load_corpus(offline_cache["root"] / name)
    assert len(dataset) == info.num_cells == NUM_CELLS[name]
    assert info.genes == local_info.genes and info.covariates == local_info.covariates
    assert set(info.covariates) == {"cell_type", "bulk_labels"}
    assert dataset[:] == local[:]
    streamed = next(iter(load_corpus(REPO, streaming=True, revision=revision)[0]))
    assert streamed == local[0]


def test_unknown_repo_or_revision_names_the_repo_and_the_fix(offline_cache):
    with pytest.raises(InputDataError, match=r"'scldm-tests/absent' is neither a local folder nor a Hub dataset .*"
                                             r"hf download scldm-tests/absent --repo-type dataset"):
        load_corpus("scldm-tests/absent")
    with pytest.raises(InputDataError, match=r"at revision 'v9'"):
        load_corpus(REPO, revision="v9")


def test_train_from_a_hub_dataset_records_it_in_the_model_card(offline_cache, tmp_path):
    out = tmp_path / "vae"
    assert main(["train", "vae", "--config", str(TINY), "--data", REPO, "--data_revision", "v0", "--output_dir",
                 str(out), "--max_train_steps", "2", "--checkpointing_steps", "2", "--covariates", "cell_type"]) == 0
    _, info = load_corpus(REPO, revision="v0")
    assert SCVAEModel.from_pretrained(out).config.gene_names == info.genes
    card = ModelCard.load(out / "README.md")
    assert card.data.datasets == [REPO]
    assert card.data.eval_results and all(result.dataset_name == REPO for result in card.data.eval_results)
    assert np.isfinite([result.metric_value for result in card.data.eval_results]).all()
