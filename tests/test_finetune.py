"""Fine-tuning a trained pipeline on data with new labels / a new covariate, and loading it by Hub repo id offline."""

import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants

from scldm_hf.data import anndata_to_corpus
from scldm_hf.errors import ConfigurationError
from scldm_hf.models.modeling_scvae import SCVAEModel
from scldm_hf.models.transformer_latent_dit import LatentDiTTransformer
from scldm_hf.pipelines import SCLDMPipeline
from scldm_hf.training import DiTTrainingConfig, FinetuneConfig, VAETrainingConfig, load_config
from scldm_hf.training.dit import refit_library_size_model, train_dit
from scldm_hf.training.finetune import finetune
from scldm_hf.training.vae import train_vae

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"
HELD_BACK_TYPES = ["CD19+ B", "CD56+ NK"]  # absent from the pretraining cells, added by fine-tuning
REPO_ID = "scldm-tests/tiny-pbmc"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pbmc200(pbmc_counts):
    return pbmc_counts[:200].copy()


@pytest.fixture(scope="module")
def pretrained(pbmc200, tmp_path_factory):
    """A tiny pipeline trained on PBMC cells without the HELD_BACK_TYPES (8 cell-type labels)."""
    root = tmp_path_factory.mktemp("pretrained")
    cells = pbmc200[~pbmc200.obs["cell_type"].isin(HELD_BACK_TYPES)].copy()
    anndata_to_corpus(cells, root / "corpus", covariates=["cell_type"])
    common = {"data": str(root / "corpus")}
    train_vae(load_config(VAETrainingConfig, TINY, common | {"output_dir": str(root / "vae")}, section="vae"))
    train_dit(load_config(DiTTrainingConfig, TINY, common | {"output_dir": str(root / "pipeline"),
                                                              "vae_name_or_path": str(root / "vae")}, section="dit"))
    return root / "pipeline"


@pytest.fixture(scope="module")
def hub_cache(pretrained, tmp_path_factory):
    """The pretrained pipeline as repo REPO_ID in a Hugging Face cache folder, with the Hub made unreachable."""
    cache = tmp_path_factory.mktemp("hf_cache")
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    shutil.copytree(pretrained, repo / "snapshots" / COMMIT, ignore=shutil.ignore_patterns("checkpoints", "latent_cache", "logs"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        yield cache


def finetune_config(**overrides) -> FinetuneConfig:
    return load_config(FinetuneConfig, TINY, overrides, section="finetune")


def test_saved_pipeline_loads_from_offline_hub_cache_by_repo_id(pretrained, hub_cache):
    from_hub = SCLDMPipeline.from_pretrained(REPO_ID, local_files_only=True)
    from_folder = SCLDMPipeline.from_pretrained(pretrained)
    for name, value in from_folder.transformer.state_dict().items():
        assert torch.equal(from_hub.transformer.state_dict()[name], value), name
    cells = from_hub(conditions={"cell_type": ["Dendritic"]}, num_cells=4, num_inference_steps=2,
                     generator=torch.Generator().manual_seed(0)).cells
    assert cells.shape == (4, 765) and list(cells.obs["cell_type"]) == ["Dendritic"] * 4


def test_finetune_adds_labels_and_keeps_old_labels_bit_identical(pretrained, hub_cache, pbmc200, tmp_path):
    """Start from the Hub id (offline cache); the new cells bring two unseen cell types."""
    output_dir = tmp_path / "finetuned"
    corpus = tmp_path / "corpus"
    anndata_to_corpus(pbmc200, corpus, covariates=["cell_type"])
    finetune(finetune_config(pipeline_name_or_path=REPO_ID, local_files_only=True, data=str(corpus),
                             output_dir=str(output_dir), weight_decay=0.1))

    before = LatentDiTTransformer.from_pretrained(pretrained / "transformer")
    tuned = SCLDMPipeline.from_pretrained(output_dir)
    old_labels = SCLDMPipeline.from_pretrained(pretrained).conditioner.config.covariate_labels["cell_type"]
    assert tuned.conditioner.config.covariate_labels["cell_type"] == old_labels + HELD_BACK_TYPES
    old_table = before.covariate_embedders["cell_type"].weight
    new_table = tuned.transformer.covariate_embedders["cell_type"].weight
    num_old = len(old_labels)
    assert new_table.shape[0] == num_old + len(HELD_BACK_TYPES) + 1
    assert torch.equal(new_table[:num_old], old_table[:num_old])  # old labels
    assert torch.equal(new_table[-1], old_table[num_old])  # the null label, moved to the end
    for row in range(num_old, num_old + len(HELD_BACK_TYPES)):  # new labels start as the null row, then train
        assert not torch.equal(new_table[row], old_table[num_old])
    assert not torch.equal(tuned.transformer.proj_in.weight, before.proj_in.weight)
    vae_before = SCVAEModel.from_pretrained(pretrained / "vae").state_dict()
    assert all(torch.equal(value, vae_before[name]) for name, value in tuned.vae.state_dict().items())
    # the library-size model keeps its latent regression and old groups and gains the new labels' groups
    old_conditioner = SCLDMPipeline.from_pretrained(pretrained).conditioner
    assert old_conditioner.uses_latents and tuned.conditioner.uses_latents
    assert torch.equal(tuned.conditioner.latent_library_weight, old_conditioner.latent_library_weight)
    num_old_groups = len(old_conditioner.group_num_cells)
    assert torch.equal(tuned.conditioner.group_log_mean[:num_old_groups], old_conditioner.group_log_mean)
    new_group_labels = set(tuned.conditioner.group_label_ids[num_old_groups:, 0].tolist())
    assert {num_old, num_old + 1} <= new_group_labels

    cells = tuned(conditions={"cell_type": ["CD14+ Monocyte", "CD19+ B", "CD56+ NK"]}, num_inference_steps=3,
                  generator=torch.Generator().manual_seed(0)).cells
    assert list(cells.obs["cell_type"]) == ["CD14+ Monocyte", "CD19+ B", "CD56+ NK"]
    counts = cells.X.toarray()
    assert cells.shape == (3, 765) and (counts >= 0).all() and (counts == np.round(counts)).all()
    assert counts.sum(axis=1).min() > 0

    card = ModelCard.load(output_dir / "README.md")
    assert card.data.base_model == REPO_ID
    assert "`cell_type` (10 labels)" in card.text and "CD19+ B, CD56+ NK" in card.text


def test_finetune_adds_a_new_covariate_and_tunes_the_vae(pretrained, shared_data_dir, tmp_path):
    """Kang et al. 2018 PBMCs (control / IFN-beta): new cell-type names ("Dendritic" is shared) and a new
    `condition` covariate; the h5ad is mapped onto the pretrained 765-gene vocabulary."""
    kang = ad.read_h5ad(shared_data_dir / "kang2018_pbmc_ifnb_counts.h5ad")
    subset = tmp_path / "kang_subset.h5ad"
    kang[::8].copy().write_h5ad(subset)
    output_dir = tmp_path / "finetuned"
    with pytest.warns(UserWarning, match="not in the 765-gene vocabulary"):
        finetune(finetune_config(pipeline_name_or_path=str(pretrained), data=str(subset), output_dir=str(output_dir),
                                 covariates=["cell_type", "condition"], freeze_vae=False, vae_max_train_steps=4))

    tuned = SCLDMPipeline.from_pretrained(output_dir)
    labels = tuned.conditioner.config.covariate_labels
    old_labels = SCLDMPipeline.from_pretrained(pretrained).conditioner.config.covariate_labels["cell_type"]
    kang_types = sorted(kang.obs["cell_type"].unique())
    assert labels["condition"] == ["control", "stimulated"]
    assert labels["cell_type"] == old_labels + [label for label in kang_types if label not in old_labels]
    assert tuned.transformer.config.covariate_num_labels == {"cell_type": len(labels["cell_type"]), "condition": 2}
    vae_before = SCVAEModel.from_pretrained(pretrained / "vae").state_dict()
    assert any(not torch.equal(value, vae_before[name]) for name, value in tuned.vae.state_dict().items())

    cells = tuned(conditions={"cell_type": ["CD4T", "Dendritic"], "condition": ["stimulated", "control"]},
                  num_inference_steps=3, generator=torch.Generator().manual_seed(0)).cells
    assert cells.obs.astype(str).values.tolist() == [["CD4T", "stimulated"], ["Dendritic", "control"]]
    assert cells.X.sum(axis=1).min() > 0


def test_refit_library_size_model_reproduces_training_and_switches_models(pretrained, tmp_path):
    """An older pipeline can be given the latent library-size model without retraining: the refit on its latent
    cache reproduces what training fitted; "labels" goes back to the per-label log-normals, generation unchanged
    otherwise."""
    folder = tmp_path / "pipeline"
    shutil.copytree(pretrained, folder, ignore=shutil.ignore_patterns("checkpoints"))
    trained = SCLDMPipeline.from_pretrained(pretrained).conditioner
    labels_only = refit_library_size_model(folder, "labels")
    assert not labels_only.conditioner.uses_latents
    assert not hasattr(labels_only.conditioner, "latent_library_weight")
    refitted = refit_library_size_model(folder, "latent").conditioner
    assert refitted.uses_latents
    for name in ("latent_library_weight", "latent_offset_range", "group_log_mean", "group_log_var"):
        torch.testing.assert_close(getattr(refitted, name), getattr(trained, name))
    assert float(refitted.group_log_var.max()) < float(labels_only.conditioner.group_log_var.max())
    cells = labels_only(conditions={"cell_type": ["CD14+ Monocyte"]}, num_cells=3, num_inference_steps=2,
                        generator=torch.Generator().manual_seed(0)).cells
    assert cells.shape == (3, 765) and cells.X.sum(axis=1).min() > 0
    nearest = refit_library_size_model(folder, "nearest")
    assert nearest.conditioner.library_size_model == "nearest"
    recipe = yaml.safe_load((folder / "training_config.yaml").read_text())  # the provenance says so too
    assert recipe["library_size_model"] == "nearest"
    assert recipe["seed"] == yaml.safe_load((pretrained / "training_config.yaml").read_text())["seed"]
    card = (folder / "README.md").read_text()  # the card now says how this model draws library sizes
    assert "one of its 5 nearest training cells of its condition" in card and "log-normal" not in card
    assert nearest.conditioner.config.num_reference_cells == int(labels_only.conditioner.group_num_cells.sum())
    torch.testing.assert_close(nearest.conditioner.group_log_mean, labels_only.conditioner.group_log_mean)
    conditions = {"cell_type": ["CD14+ Monocyte"]}
    latents = nearest(conditions=conditions, num_cells=3, num_inference_steps=2, output_type="latent",
                      generator=torch.Generator().manual_seed(0)).cells
    sizes = nearest.sample_library_size(latents, nearest.conditioner.encode(conditions, 3))
    references = nearest.conditioner.reference_log_library_size
    assert (sizes.log()[:, None] - references[None, :]).abs().min(dim=1).values.max() < 1e-4  # training depths
    with pytest.raises(ConfigurationError, match="library_size_model='lat' is not one of"):
        refit_library_size_model(folder, "lat")  # a typo used to fit the labels model silently
    (folder / "README.md").write_text("a card written by hand")
    with pytest.warns(UserWarning, match="update its description of library sizes by hand"):
        refit_library_size_model(folder, "labels")
    assert (folder / "README.md").read_text() == "a card written by hand"
