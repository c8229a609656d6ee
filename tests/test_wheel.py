"""A non-editable install (the wheel a user gets) trains, pushes (network replaced), loads by repo id and generates;
what it uploads carries valid model cards and no local path."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, get_cached_repo_tree
from hub_cache import use_offline_cache

REPO_ROOT = Path(__file__).resolve().parents[1]
VAE_REPO, PIPELINE_REPO = "scldm-tests/wheel-vae", "scldm-tests/wheel-pipeline"

pytestmark = pytest.mark.slow

IN_VENV = textwrap.dedent("""
    import importlib.util, json, sys
    from pathlib import Path

    import scldm_hf
    from scldm_hf.cli import main
    from scldm_hf.resources import resource_dir
    from scldm_hf.training import hub

    sys.path.insert(0, sys.argv[2])  # the tests folder, for the cache helper
    from hub_cache import FakeHubApi

    out, h5ad = Path(sys.argv[1]), sys.argv[3]
    hub.HfApi = lambda token=None: FakeHubApi(out / "cache")
    recipe = str(resource_dir("recipes") / "tiny.yaml")
    steps = ["--max_train_steps", "2", "--checkpointing_steps", "2", "--push_to_hub", "true"]
    assert main(["train", "vae", "--config", recipe, "--data", h5ad, "--output_dir", str(out / "vae"),
                 "--hub_model_id", sys.argv[4], *steps]) == 0
    assert main(["train", "dit", "--config", recipe, "--data", str(out / "vae" / "corpus"),
                 "--vae_name_or_path", sys.argv[4], "--output_dir", str(out / "pipeline"),
                 "--hub_model_id", sys.argv[5], "--num_eval_cells", "0", *steps]) == 0
    assert main(["generate", sys.argv[5], "--num-cells", "5", "--steps", "2", "--out", str(out / "generated.h5ad")]) == 0
    print(json.dumps({"package": scldm_hf.__file__, "pipelines": importlib.util.find_spec("pipelines") is not None}))
""")


@pytest.fixture(scope="module")
def wheel_run(pbmc_counts, tmp_path_factory):
    """Build the wheel, install it into a fresh venv that reuses this environment's dependencies, run IN_VENV."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # setuptools builds in the source tree (build/, *.egg-info): build a copy
    for name in ("pyproject.toml", "README.md", "scldm_hf", "model_cards", "training/configs"):
        copy = shutil.copytree if (REPO_ROOT / name).is_dir() else shutil.copy
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        copy(REPO_ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    venv_python = root / "venv" / "bin" / "python"
    venv_site = Path(subprocess.run([venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    check=True, capture_output=True, text=True).stdout.strip())
    # a plain path line: the editable install's .pth files in that folder are not processed, so scldm_hf can only
    # come from the wheel
    (venv_site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next((root / "dist").glob("scldm_hf-*.whl"))
    subprocess.run([venv_python, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    pbmc_counts[:120].copy().write_h5ad(root / "cells.h5ad")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env |= {"HF_HUB_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [venv_python, "-c", IN_VENV, str(root), str(Path(__file__).parent), str(root / "cells.h5ad"), VAE_REPO,
         PIPELINE_REPO], cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root, venv_site, json.loads(result.stdout.strip().splitlines()[-1])


def test_wheel_installs_the_package_with_its_data_and_no_pipelines_package(wheel_run):
    root, venv_site, report = wheel_run
    assert Path(report["package"]).is_relative_to(venv_site)
    assert not report["pipelines"]
    assert (root / "generated.h5ad").is_file() and (root / "generated.h5ad").stat().st_size > 0


def test_uploads_hold_valid_cards_and_no_local_path(wheel_run, monkeypatch):
    root, _, _ = wheel_run
    use_offline_cache(monkeypatch, root / "cache")
    for repo, library in ((VAE_REPO, "transformers"), (PIPELINE_REPO, "diffusers")):
        snapshot = next((root / "cache" / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir())
        files = [file.path for file in get_cached_repo_tree(repo)]
        assert "training_config.yaml" in files and "README.md" in files
        for path in files:
            text = (snapshot / path).read_bytes().decode(errors="replace")
            assert str(root) not in text and str(REPO_ROOT) not in text, f"{repo}/{path} holds a local path"
        card = ModelCard.load(snapshot / "README.md")
        data = card.data
        assert (data.library_name, data.license, data.pipeline_tag) == (
            library, "apache-2.0", {"transformers": "feature-extraction", "diffusers": "other"}[library])
        assert "single-cell" in data.tags and data.base_model is None and data.datasets is None
        assert data.eval_results and all(result.dataset_split == "validation" for result in data.eval_results)
        assert "Source:** `cells.h5ad`" in card.text
    pipeline_card = ModelCard.load(next((root / "cache" / "models--scldm-tests--wheel-pipeline" / "snapshots")
                                        .iterdir()) / "README.md")
    assert [result.metric_type for result in pipeline_card.data.eval_results] == ["validation_flow_matching_loss"]
    assert "no label dropout).\n\n## How to use" in pipeline_card.text
