"""Model cards rendered at the end of training, and `--push_to_hub` exercised up to the upload call.

Only the network methods of `huggingface_hub` are replaced: `HfApi.create_repo`, `HfApi._validate_yaml` (a Hub API
call) and the final upload (`pipelined_upload` with hf_xet, `HfApi.create_commit` without); `upload_folder` itself
runs, so the uploaded file list is the real one.
"""

import csv
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, RepoUrl

from scldm_hf.evaluation import ProtocolCardMetrics
from scldm_hf.models.conditioning import RIDGE_CANDIDATES
from scldm_hf.pipelines import SCLDMPipeline
from scldm_hf.training import DiTTrainingConfig, VAETrainingConfig, load_config
from scldm_hf.training.dit import train_dit
from scldm_hf.training.vae import train_vae

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"
HUB_ID = "someone/tiny-scvae"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def h5ad(pbmc_counts, tmp_path_factory):
    path = tmp_path_factory.mktemp("card") / "pbmc200.h5ad"
    pbmc_counts[:200].copy().write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def pushed_vae(h5ad, tmp_path_factory):
    """A tiny VAE trained from an .h5ad with ``push_to_hub``; returns its folder and the recorded Hub calls."""
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload(*args, repo_id, add_operations=None, operations=None, **kwargs):
        calls["upload"] = (repo_id, sorted(op.path_in_repo for op in add_operations or operations))

    output_dir = tmp_path_factory.mktemp("vae") / "vae"
    config = load_config(VAETrainingConfig, TINY, {"data": str(h5ad), "output_dir": str(output_dir),
                                                   "push_to_hub": True, "hub_model_id": HUB_ID}, section="vae")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HfApi, "create_repo", create_repo)
        patch.setattr(HfApi, "_validate_yaml", lambda self, content, **kwargs: None)
        patch.setattr("huggingface_hub._upload_pipeline.pipelined_upload", upload)
        patch.setattr(HfApi, "create_commit", lambda self, **kwargs: upload(**kwargs))
        train_vae(config, ProtocolCardMetrics())
    return output_dir, calls


def final_metrics(output_dir: Path) -> dict[str, float]:
    with (output_dir / "logs" / "metrics.csv").open() as file:
        return {row["metric"].removeprefix("final/"): float(row["value"]) for row in csv.DictReader(file)
                if row["metric"].startswith("final/")}


def test_push_uploads_weights_and_card_but_not_training_by_products(pushed_vae):
    output_dir, calls = pushed_vae
    assert calls["create_repo"] == (HUB_ID, {"private": False, "exist_ok": True})
    repo_id, uploaded = calls["upload"]
    assert repo_id == HUB_ID
    assert {"README.md", "config.json", "model.safetensors", "training_config.yaml", "logs/metrics.csv"} <= set(uploaded)
    assert not [path for path in uploaded if path.startswith(("checkpoints/", "corpus/"))]
    assert (output_dir / "checkpoints" / "checkpoint-12").is_dir() and (output_dir / "corpus" / "corpus.json").is_file()


def test_vae_card_reports_data_and_measured_metrics(pushed_vae):
    output_dir, _ = pushed_vae
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.library_name == "transformers" and "single-cell" in card.data.tags
    text = card.text
    assert "**Cells:** 200 (180 for training, 20 held out for validation)" in text
    assert "**Genes:** 765 in the vocabulary, 765 measured in this data" in text
    assert "`cell_type` (10 labels): CD14+ Monocyte, CD19+ B, CD34+," in text
    metrics = final_metrics(output_dir)
    assert set(metrics) == {"validation_loss", "reconstruction_pearson", "reconstruction_mse", "nb_nll_per_cell"}
    for name, value in metrics.items():
        assert f"| {name} | {value:.4g} |" in text
    assert f'SCVAEModel.from_pretrained("{HUB_ID}")' in text
    assert "max_train_steps: 12" in text and "hub_token" not in text


def test_pipeline_card_reports_generation_metrics_under_the_protocol(pushed_vae, tmp_path):
    vae_dir, _ = pushed_vae
    output_dir = tmp_path / "pipeline"
    train_dit(load_config(DiTTrainingConfig, TINY, {
        "data": str(vae_dir / "corpus"), "output_dir": str(output_dir), "vae_name_or_path": str(vae_dir),
        "validation_fraction": 0.5, "num_eval_cells": 200, "eval_inference_steps": 4,
    }, section="dit"), ProtocolCardMetrics())
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.library_name == "diffusers"
    text = card.text
    assert "**Cells:** 200 (100 for training, 100 held out for validation)" in text
    assert "log-normal model, shifted by a linear regression on each generated latent" in text  # the default
    ridge = SCLDMPipeline.from_pretrained(output_dir).conditioner.config.latent_library_ridge
    assert ridge in RIDGE_CANDIDATES and f"ridge {ridge:g}, chosen by generalised cross-validation" in text
    metrics = final_metrics(output_dir)
    assert {"validation_flow_matching_loss", "mmd_rbf", "wasserstein_2", "classifier_auroc"} <= set(metrics)
    # the card's protocol: PCA on the training cells, equal counts, the real floor (held-out cells split) beside
    assert {"mmd_rbf_real_floor", "classifier_auroc_real_floor", "nn_accuracy_real_floor"} <= set(metrics)
    assert metrics["n_real"] == metrics["n_generated"] <= 50
    for name, value in metrics.items():
        assert f"| {name} | {value:.4g} |" in text
    assert "`mmd_rbf`: unbiased MMD^2" in text and "`mmd_rbf_real_floor`: real-vs-real floor of mmd_rbf" in text
    assert 'conditions={"cell_type": ["CD14+ Monocyte"]},\n    guidance_scale=2.0,' in text
    assert '--condition cell_type="CD14+ Monocyte"' in text
