"""Models pushed through the package's push path (network replaced by `hub_cache.FakeHubApi`) load by repo id from a
Hugging Face cache laid out as a real download leaves it, with and without scldm_hf installed."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from huggingface_hub import get_cached_repo_tree
from hub_cache import FakeHubApi, use_offline_cache

from scldm_hf.cli import main
from scldm_hf.hub_code import PACKAGE_IMPORT
from scldm_hf.loading import load_pipeline, load_vae
from scldm_hf.models import SCVAEConfig, SCVAEModel
from scldm_hf.models.conditioning import CellConditioner
from scldm_hf.models.transformer_latent_dit import LatentDiTTransformer
from scldm_hf.pipelines import SCLDMCounterfactualPipeline, SCLDMPipeline
from scldm_hf.training import DiTTrainingConfig, hub, load_config
from scldm_hf.training.model_card import PIPELINE_TEMPLATE, DataProvenance, render_model_card

PIPELINE_REPO = "scldm-tests/tiny-pipeline"
VAE_REPO = "scldm-tests/tiny-vae"
CONDITIONS = {"cell_type": ["B", "T", "B"]}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


VAE_CONFIG = {"hidden_size": 16, "num_latent_tokens": 2, "latent_dim": 4, "encoder_layers": 1, "decoder_layers": 1,
              "encoder_cross_attention_heads": 2, "decoder_cross_attention_heads": 2, "num_attention_heads": 2}
DIT_CONFIG = {"num_latent_tokens": 2, "latent_dim": 4, "hidden_size": 16, "num_layers": 1, "num_attention_heads": 2,
              "timestep_embedding_dim": 16}


def tiny_pipeline(seed: int) -> SCLDMPipeline:
    """An untrained pipeline over 12 genes, conditioned on `cell_type` (2 labels); `seed` sets its weights."""
    torch.manual_seed(seed)
    vae = SCVAEModel(SCVAEConfig(gene_names=[f"gene{i}" for i in range(12)], **VAE_CONFIG))
    conditioner = CellConditioner(covariate_labels={"cell_type": ["B", "T"]})
    conditioner.group_log_mean.fill_(6.0)  # about 400 counts per cell
    transformer = LatentDiTTransformer(**DIT_CONFIG, covariate_num_labels=conditioner.num_labels)
    pipe = SCLDMPipeline(vae, transformer, FlowMatchEulerDiscreteScheduler(), conditioner)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe) -> np.ndarray:
    cells = pipe(conditions=CONDITIONS, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).cells
    return cells.X.toarray()


def token_batch(vae: SCVAEModel) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "gene_ids": torch.randint(1, vae.config.vocab_size + 1, (3, 5), generator=generator),
        "counts": torch.randint(1, 9, (3, 5), generator=generator).float(),
        "attention_mask": torch.ones(3, 5, dtype=torch.bool),
    }


@pytest.fixture(scope="module")
def hub_repos(tmp_path_factory):
    """Pushes `v0` (tagged) then a second pipeline to PIPELINE_REPO, and the VAE alone to VAE_REPO."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    api = FakeHubApi(cache)
    first, second = tiny_pipeline(seed=0), tiny_pipeline(seed=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hub, "HfApi", lambda token=None: api)
        for name, pipe in (("v0", first), ("v1", second)):
            pipe.save_pretrained(root / name)
            hub.push_folder_to_hub(root / name, PIPELINE_REPO)
            if name == "v0":
                api.create_tag(PIPELINE_REPO, "v0")
        second.vae.save_pretrained(root / "vae")
        hub.push_folder_to_hub(root / "vae", VAE_REPO)
    return {"cache": cache, "root": root, "first": first, "second": second, "v0_commit": api.commits[0][1]}


@pytest.fixture
def offline_cache(hub_repos, monkeypatch):
    use_offline_cache(monkeypatch, hub_repos["cache"])
    return hub_repos


def test_pushed_repo_is_laid_out_as_a_download_with_its_code(offline_cache):
    files = {file.path for file in get_cached_repo_tree(PIPELINE_REPO)}
    assert {"model_index.json", "pipeline_scldm.py", "vae/modeling_scvae.py", "vae/config.json",
            "transformer/transformer_latent_dit.py", "conditioner/conditioning.py"} <= files
    snapshot = offline_cache["cache"] / "models--scldm-tests--tiny-pipeline" / "snapshots"
    commit = (snapshot.parent / "refs" / "main").read_text()
    index = json.loads((snapshot / commit / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_scldm", "SCLDMPipeline"]
    assert index["vae"] == ["modeling_scvae", "SCVAEModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    for path in files:
        text = (snapshot / commit / path).read_bytes().decode(errors="replace")
        assert not (path.endswith(".py") and PACKAGE_IMPORT.search(text)), f"{path} imports the package"
        assert str(offline_cache["root"]) not in text, f"{path} holds a local path"


def test_pipelines_and_vae_load_by_repo_id_from_the_offline_cache(offline_cache):
    second = offline_cache["second"]
    loaded = SCLDMPipeline.from_pretrained(PIPELINE_REPO)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.vae) is SCVAEModel and not loaded.vae.training
    np.testing.assert_array_equal(generate(loaded), generate(second))
    assert type(SCLDMCounterfactualPipeline.from_pretrained(PIPELINE_REPO)) is SCLDMCounterfactualPipeline
    vae = SCVAEModel.from_pretrained(PIPELINE_REPO, subfolder="vae")
    batch = token_batch(vae)
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(**batch).latents, second.vae.encode(**batch).latents)
        torch.testing.assert_close(load_vae(VAE_REPO).encode(**batch).latents, second.vae.encode(**batch).latents)


def test_revision_selects_a_tag_or_a_commit(offline_cache, tmp_path):
    first, second = generate(offline_cache["first"]), generate(offline_cache["second"])
    assert not np.array_equal(first, second)
    for revision in ("v0", offline_cache["v0_commit"]):
        for loaded in (SCLDMPipeline.from_pretrained(PIPELINE_REPO, revision=revision),
                       load_pipeline(PIPELINE_REPO, revision=revision)):
            loaded.set_progress_bar_config(disable=True)
            np.testing.assert_array_equal(generate(loaded), first)
    np.testing.assert_array_equal(generate(load_pipeline(PIPELINE_REPO)), second)
    assert main(["generate", PIPELINE_REPO, "--revision", "v0", "--num-cells", "4", "--steps", "2",
                 "--out", str(tmp_path / "v0.h5ad")]) == 0
    assert main(["generate", PIPELINE_REPO, "--num-cells", "4", "--steps", "2",
                 "--out", str(tmp_path / "main.h5ad")]) == 0
    v0, latest = ad.read_h5ad(tmp_path / "v0.h5ad"), ad.read_h5ad(tmp_path / "main.h5ad")
    assert (v0.X != latest.X).nnz > 0
    assert main(["generate", PIPELINE_REPO, "--revision", "v9", "--out", str(tmp_path / "x.h5ad")]) == 2


SELF_CONTAINED = textwrap.dedent("""
    import importlib.abc, json, sys
    from pathlib import Path

    class BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "scldm_hf":
                raise ImportError("scldm_hf is not installed here")

    sys.meta_path.insert(0, BlockPackage())
    try:
        import scldm_hf
    except ImportError:
        pass
    else:
        raise SystemExit("scldm_hf is importable")

    import numpy as np, torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import dynamic_modules_utils
    from huggingface_hub import constants
    from huggingface_hub.hf_api import ModelInfo
    from transformers import AutoModel

    # The one network call diffusers makes for a repo's custom pipeline code, answered from the cache's refs.
    def model_info(repo_id, revision=None, token=None):
        refs = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")) / "refs"
        return ModelInfo(id=repo_id, sha=(refs / (revision or "main")).read_text())

    dynamic_modules_utils.model_info = model_info
    out = Path(sys.argv[1])
    pipe = DiffusionPipeline.from_pretrained(sys.argv[2], trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    cells = pipe(conditions={"cell_type": ["B", "T", "B"]}, num_inference_steps=3,
                 generator=torch.Generator().manual_seed(0)).cells
    np.save(out / "cells.npy", cells.X.toarray())
    batch = torch.load(out / "batch.pt")
    with torch.no_grad():
        for name, vae in (("vae", AutoModel.from_pretrained(sys.argv[3], trust_remote_code=True)),
                          ("subfolder", AutoModel.from_pretrained(sys.argv[2], subfolder="vae", trust_remote_code=True))):
            torch.save(vae.encode(**batch).latents, out / f"{name}.pt")
    modules = sorted({type(m).__module__.split(".")[0] for m in (pipe, pipe.vae, pipe.transformer, pipe.conditioner)})
    print(json.dumps({"modules": modules, "loaded": sorted(n for n in sys.modules if n.startswith("scldm_hf"))}))
""")


def test_pushed_repos_load_and_run_where_scldm_hf_cannot_be_imported(offline_cache, tmp_path):
    second = offline_cache["second"]
    batch = token_batch(second.vae)
    torch.save(batch, tmp_path / "batch.pt")
    env = {**os.environ, "HF_HUB_CACHE": str(offline_cache["cache"]), "HF_HUB_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", SELF_CONTAINED, str(tmp_path), PIPELINE_REPO, VAE_REPO],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"modules": ["diffusers_modules"], "loaded": []}
    np.testing.assert_array_equal(np.load(tmp_path / "cells.npy"), generate(second))
    with torch.no_grad():
        expected = second.vae.encode(**batch).latents
    for name in ("vae", "subfolder"):
        torch.testing.assert_close(torch.load(tmp_path / f"{name}.pt"), expected)


def test_card_metadata_names_hub_ids_and_no_local_paths(tmp_path):
    tiny = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"
    provenance = DataProvenance(source=str(tmp_path / "cells.h5ad"), num_cells=10, num_train_cells=9,
                                num_validation_cells=1, num_genes=12, num_measured_genes=12)
    for data, base_model, datasets, base in (("org/cells", "org/base", ["org/cells"], "org/base"),
                                              (str(tmp_path / "corpus"), str(tmp_path / "base"), None, None)):
        config = load_config(DiTTrainingConfig, tiny, {"data": data, "output_dir": str(tmp_path / "pipeline"),
                                                       "vae_name_or_path": str(tmp_path / "vae")}, section="dit")
        card = render_model_card(PIPELINE_TEMPLATE, config, provenance, {"validation_flow_matching_loss": 0.5},
                                 library_name="diffusers", base_model=base_model, metric_descriptions={})
        assert (card.data.datasets, card.data.base_model, card.data.pipeline_tag) == (datasets, base, "other")
        assert [(result.metric_type, result.metric_value) for result in card.data.eval_results] == [
            ("validation_flow_matching_loss", 0.5)]
        assert str(tmp_path) not in str(card)
        assert ("Fine-tuned from `org/base`." if base else "Fine-tuned from a local pipeline.") in card.text
